#!/usr/bin/env python3
"""The package's shape from its own imports: module count, largest modules, import circles.

    python3 tools/layers.py [CHECKOUT]     # CHECKOUT defaults to this repository
    python3 tools/layers.py --write-docs   # rewrite docs/architecture.md's figures from them

Reads every ``import pytest_kerasmp...`` of every module (also inside functions and under
``if TYPE_CHECKING:``: a circle of type-only imports is still two modules that need each
other), builds the graph and prints its strongly connected components of more than one
module: each is an import circle. Runs on any checkout, so the figures of an old commit can
be set beside today's (``git worktree add /tmp/old COMMIT && python3 tools/layers.py /tmp/old``).
``tests/test_layers.py`` enforces the rule itself (no circle, the layering, module size) and
that docs/architecture.md holds this tool's figures for the checkout it documents.
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
    found: set[str] = set()
    for node in ast.walk(tree):
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


BEGIN, END = "<!-- tools/layers.py: begin -->", "<!-- tools/layers.py: end -->"


def figures(checkout: Path) -> str:
    """The figures as markdown: the whole package, each part, the rooms of runtime/, circles."""
    root = checkout / "pytest_kerasmp"
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    graph = {module_name(p, root): imports(p, known) - {module_name(p, root)} for p in files}
    lines = {p.relative_to(root).as_posix(): len(p.read_text().splitlines()) for p in files}
    inits = sum(p.name == "__init__.py" for p in files)
    found = circles(graph)

    def rows(group: dict[str, list[str]]) -> list[str]:
        out = []
        for name, members in group.items():
            largest = max(members, key=lambda m: lines[m])
            out.append(f"| `{name}` | {len(members)} | {sum(lines[m] for m in members)} | `{largest}` {lines[largest]} |")
        return out

    parts: dict[str, list[str]] = {}
    rooms: dict[str, list[str]] = {}
    for name in lines:
        first = name.split("/")[0]
        parts.setdefault(first.removesuffix(".py") + ("/" if "/" in name else ""), []).append(name)
        if first == "runtime" and name.count("/") >= 1:
            room = name.split("/")[1]
            rooms.setdefault(room.removesuffix(".py") + ("/" if name.count("/") == 2 else ""), []).append(name)
    head = ["| part | files | lines | largest module |", "| --- | --- | --- | --- |"]
    return "\n".join([
        f"{len(files)} files ({len(files) - inits} modules + {inits} `__init__`), {sum(lines.values())} lines;"
        f" import circles (type-only imports counted): {len(found)}"
        + "".join(f"; {' <-> '.join(c)}" for c in found) + ".",
        "", *head, *rows(dict(sorted(parts.items()))),
        "", "The rooms of `runtime/`:", "", *head, *rows(dict(sorted(rooms.items()))),
    ])


def write_docs(checkout: Path) -> bool:
    """Rewrite the figures between the markers of docs/architecture.md; True if they changed."""
    doc = checkout / "docs" / "architecture.md"
    text = doc.read_text()
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    new = f"{before}{BEGIN}\n{figures(checkout)}\n{END}{after}"
    if new != text:
        doc.write_text(new)
    return new != text


def main(argv: list[str]) -> None:
    if argv[:1] == ["--write-docs"]:
        checkout = Path(__file__).resolve().parent.parent
        print("docs/architecture.md:", "rewritten" if write_docs(checkout) else "already current")
        return
    print(figures(Path(argv[0]) if argv else Path(__file__).resolve().parent.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
