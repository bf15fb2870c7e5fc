"""The package's layering rule (its docstring), checked by reading every import of every module.

Any ``import pytest_kerasmp...`` counts, at module level or inside a function; only imports
under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import pytest_kerasmp

PACKAGE = pathlib.Path(pytest_kerasmp.__file__).parent
#: Each part of the package and the parts below it that it may import (its own always).
ALLOWED = {
    "errors": set(),
    "frameworks": {"errors"},
    "slots": {"errors", "frameworks"},
    "modelref": {"errors", "frameworks"},
    "runtime": {"errors", "frameworks", "slots", "modelref"},
    "ray": {"errors", "frameworks", "slots", "modelref", "runtime"},
    "measure": {"errors", "frameworks", "slots"},
    "plugin": {"errors", "frameworks", "slots", "modelref", "runtime", "ray", "measure"},
}
PYTEST_MODULES = ("pytest", "_pytest", "xdist", "pytest_benchmark", "pluggy")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _part(module: str) -> str:
    """``pytest_kerasmp.runtime.pool.workerpool`` -> ``runtime``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (package modules and third
    party, as dotted names; ``from pkg import sub`` is resolved to the submodule)."""
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _in_type_checking(node, parents):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
        graph[name] = found
    return graph


GRAPH = _imports()
OURS = {m: {i for i in deps if i.startswith("pytest_kerasmp")} for m, deps in GRAPH.items()}


def test_every_part_is_named_in_the_rule():
    parts = {_part(m) for m in GRAPH} - {""}
    assert parts == set(ALLOWED), "a new part of the package needs its place in the layering rule"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _part(m)))
def test_a_module_imports_only_the_layers_below_its_own(module):
    part = _part(module)
    wrong = sorted(i for i in OURS[module] if _part(i) not in {part, *ALLOWED[part]} and i != "pytest_kerasmp")
    assert not wrong, f"{module} ({part}) may import only {sorted(ALLOWED[part])} and itself, not {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _part(m) != "plugin"))
def test_nothing_below_the_plugin_imports_pytest(module):
    wrong = sorted(i for i in GRAPH[module] if i.split(".")[0] in PYTEST_MODULES)
    assert not wrong, f"{module} imports {wrong}: only pytest_kerasmp.plugin may"


def test_no_import_circle():
    """Tarjan's strongly connected components over the package's own imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in OURS.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_no_module_is_much_over_600_lines():
    # One cohesive module up to about 600 lines (the house style): splitting one only to pass
    # a smaller cap made import circles and private calls across files.
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {name: n for name, n in sizes.items() if n > 620}
    assert not big, f"split these modules (about 600 lines at most): {big}"
