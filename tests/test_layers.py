"""The package's layering rule (its docstring), checked by reading every import of every module.

Any ``import pytest_kerasmp...`` counts, at module level or inside a function. Imports under
``if TYPE_CHECKING:`` never run: the layers leave them out, the circle test and the rule inside
``runtime/`` count them (a circle of type-only imports is still two modules that need each other).
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
    "load": {"errors", "frameworks", "slots", "modelref", "runtime", "measure"},
    "plugin": {"errors", "frameworks", "slots", "modelref", "runtime", "ray", "measure", "load"},
}
#: Inside runtime/: each room and the rooms it may import. Process and wire are below pool,
#: serve and cluster; serve never imports pool; the seam (backends) imports none of them.
RUNTIME_ALLOWED = {
    "wire": set(),
    "process": {"wire"},
    "backends": set(),
    "pool": {"wire", "process", "backends"},
    "serve": {"wire", "process", "backends"},
    "cluster": {"wire", "process", "pool"},
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


def _imports(type_only: bool = False) -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (package modules and third
    party, as dotted names; ``from pkg import sub`` is resolved to the submodule); with
    ``type_only``, imports under ``if TYPE_CHECKING:`` too."""
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if not type_only and isinstance(node, (ast.Import, ast.ImportFrom)) and _in_type_checking(node, parents):
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
#: The package's own imports, type-only ones included.
OURS_TYPED = {m: {i for i in deps if i.startswith("pytest_kerasmp")} for m, deps in _imports(type_only=True).items()}


def _room(module: str) -> str:
    """``pytest_kerasmp.runtime.pool.dispatch`` -> ``pool``; ``...runtime.backends`` -> ``backends``."""
    return module.split(".")[2]


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


RUNTIME = sorted(m for m in GRAPH if _part(m) == "runtime" and m.count(".") >= 2)


def test_every_room_of_runtime_is_named_in_its_rule():
    assert {_room(m) for m in RUNTIME} == set(RUNTIME_ALLOWED), "a new room of runtime/ needs its place in the rule"


@pytest.mark.parametrize("module", RUNTIME)
def test_a_runtime_module_imports_only_the_rooms_below_its_own(module):
    room = _room(module)
    wrong = sorted(
        i for i in OURS_TYPED[module]
        if _part(i) == "runtime" and i.count(".") >= 2 and _room(i) not in {room, *RUNTIME_ALLOWED[room]}
    )
    assert not wrong, f"{module} ({room}) may import only {sorted(RUNTIME_ALLOWED[room])} of runtime/, not {wrong}"


def test_no_import_circle():
    """Tarjan's strongly connected components over the package's own imports (type-only too)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in OURS_TYPED.get(v, ()):
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


def test_the_architecture_page_holds_the_figures_of_this_checkout():
    """The page's figures are the tool's: the same parts, rooms, files and circles, and lines
    within 5% (so that an edit of a few lines does not ask for a rewrite of the page)."""
    import importlib.util
    import re

    tools = PACKAGE.parent / "tools" / "layers.py"
    if not tools.exists():
        pytest.skip("not a checkout (tools/layers.py is not here)")
    spec = importlib.util.spec_from_file_location("layers_tool", tools)
    assert spec is not None and spec.loader is not None
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    written = page.partition(layers.BEGIN)[2].partition(layers.END)[0].strip()
    now = layers.figures(PACKAGE.parent)

    def numbers(text: str) -> tuple[str, list[int]]:
        return re.sub(r"\d+", "N", text), [int(n) for n in re.findall(r"\d+", text)]

    (shape_then, then), (shape_now, figures_now) = numbers(written), numbers(now)
    close = shape_then == shape_now and all(abs(a - b) <= max(2, b // 20) for a, b in zip(then, figures_now, strict=True))
    assert close, "docs/architecture.md's figures are stale: run python3 tools/layers.py --write-docs"
