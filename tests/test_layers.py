"""The layering of ``docs/architecture.md``, checked on the source: every ``numcast`` import (at the top of a
file or inside a function) goes from a layer to the same layer or one below it, and no two modules import each
other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "numcast"

# bottom to top, as in docs/architecture.md; a layer imports only from itself and the layers before it
LAYERS = ["libc", "io", "formats", "accumulator", "algorithms", "nn", "pipeline", "models", "evaluate", "training",
          "report", "interop", "workloads", "jobs", "cli", "__init__", "__main__"]  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The numcast modules ``path`` imports anywhere in the file (a name imported from a package counts as its
    submodule when one of that name exists)."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    got: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            got.update(a.name for a in node.names if a.name.split(".")[0] == "numcast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "numcast":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                got.add(sub if sub in ALL else mod)
    got.discard(me)
    return got


ALL = {module_name(p) for p in SRC.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in SRC.rglob("*.py")}


def test_every_package_has_a_layer():
    assert {layer_of(m) for m in ALL} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    rank = LAYERS.index(layer_of(module))
    up = sorted(m for m in GRAPH[module] if LAYERS.index(layer_of(m)) > rank)
    assert not up, f"{module} ({layer_of(module)}) imports from higher layers: {up}"


def test_no_import_cycles():
    """Depth-first search over the module graph; a package's ``__init__`` importing its own submodules is the
    package's public face, so edges from a submodule up to its own package are counted too."""
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
