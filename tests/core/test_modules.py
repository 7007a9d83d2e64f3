"""The module structure docs/architecture.md promises: no import circles inside the package, and
`server.py` is the pipeline (its command line is `serve_cli.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

import apiproxy

PACKAGE = Path(apiproxy.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package → the package's modules it imports, at any depth of its code
    (an import inside a function is still a dependency)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(full if full in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_round_a_circle():
    graph = import_graph()
    assert {"apiproxy.server", "apiproxy.workers", "apiproxy.serve_cli"} <= set(graph)
    assert circles(graph) == []


def test_server_is_the_pipeline_and_serve_cli_its_command_line():
    graph = import_graph()
    assert "apiproxy.serve_cli" not in graph["apiproxy.server"]
    assert "apiproxy.workers" not in graph["apiproxy.server"]
    assert {"apiproxy.server", "apiproxy.workers"} <= graph["apiproxy.serve_cli"]
    server = ast.parse((PACKAGE / "server.py").read_text())
    imported = {
        a.name.split(".")[0]
        for node in ast.walk(server)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "argparse" not in imported
    assert "flags" not in {
        a.name for n in ast.walk(server) if isinstance(n, ast.ImportFrom) for a in n.names
    }
