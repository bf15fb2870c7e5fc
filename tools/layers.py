#!/usr/bin/env python3
"""The package's shape from its own imports: module count, largest modules, import circles.

    python3 tools/layers.py [CHECKOUT]     # CHECKOUT defaults to this repository

Reads every ``import pytest_kerasmp...`` of every module (also inside functions; imports
under ``if TYPE_CHECKING:`` do not run and do not count), builds the graph and prints its
strongly connected components of more than one module: each is an import circle. Runs on
any checkout, so the figures of an old commit can be set beside today's
(``git worktree add /tmp/old COMMIT && python3 tools/layers.py /tmp/old``).
``tests/test_layers.py`` enforces the rule itself (no circle, the layering, module size).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body for inner in ast.walk(child)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return found & known


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(checkout: Path) -> None:
    root = checkout / "pytest_kerasmp"
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    graph = {module_name(p, root): imports(p, known) - {module_name(p, root)} for p in files}
    sizes = sorted(((len(p.read_text().splitlines()), p.relative_to(root).as_posix()) for p in files), reverse=True)
    inits = sum(p.name == "__init__.py" for p in files)
    print(f"modules: {len(files)} files ({len(files) - inits} modules + {inits} __init__), {sum(n for n, _ in sizes)} lines")
    print("largest:", ", ".join(f"{name} {lines}" for lines, name in sizes[:4]))
    found = circles(graph)
    print(f"import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
