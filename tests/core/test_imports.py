"""The arrows point inward (docs/architecture.md): which layer may import
which, and no import cycles.  Read from the source with `ast`, so a lazy
import inside a function counts like one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import fermoposta

ROOT = Path(fermoposta.__file__).parent

# Layer -> the layers it may import (besides itself).  Everything not named
# here (cli, demo, config, ...) sits on top and may import anything.
ALLOWED: dict[str, set[str]] = {
    "smtp": set(),
    "ops": set(),
    "store": {"smtp"},
    "net": {"smtp", "ops", "store"},
    "mail": {"smtp", "ops", "store", "net"},
    "provider": {"smtp", "ops", "store", "net", "mail", "config", "config_common", "config_schema",
                 "passwords", "cli_help"},
    "customer": {"smtp", "ops", "store", "net", "mail", "config", "config_common", "config_schema",
                 "passwords", "cli_help"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_what_they_may() -> None:
    wrong = []
    for module, deps in _graph().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue
        for dep in deps:
            other = _layer(dep)
            if other and other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_sees_lazy_imports() -> None:
    """The graph reads lazy imports too (an import inside a function)."""
    graph = _graph()
    assert "fermoposta.customer.outbox_push" in graph["fermoposta.customer.pull"]
    assert "fermoposta.smtp.reply" in graph["fermoposta.smtp.server"]
