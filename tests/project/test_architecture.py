"""The rules of docs/design.md that a reader cannot see at a glance, checked on the source: the core
imports no plugin module, and no two thresher modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "thresher"
PLUGIN_PACKAGES = ("generators", "scorers", "selectors", "losses", "loggers", "plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The thresher modules ``path`` imports, at any depth of the file (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("thresher"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thresher"):
            found.add(node.module)
            # `from thresher.core import loop` imports the module thresher.core.loop
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_core_imports_no_plugin_module():
    offending = {
        name: sorted(m for m in targets if m.split(".")[1] in PLUGIN_PACKAGES)
        for name, targets in graph().items()
        if name.startswith("thresher.core")
    }
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_no_module_level_import_cycle():
    """Module-level imports only: a function-level (lazy) import is how a cycle is broken on purpose."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thresher"):
                top.add(node.module)
                top.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                top.update(alias.name for alias in node.names if alias.name.startswith("thresher"))
        edges[name] = {m for m in top if m in modules and m != name}
    # a package's __init__ importing its own submodules is not a cycle back into the package
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if node.startswith(target + ".") or target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []
