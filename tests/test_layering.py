"""The package's import graph: no cycles, and no lower layer importing a higher one.

Protects the layout the README describes: ``data``, ``model``, ``sharding``,
``cringe`` and ``decoding`` are a library that ``config``, ``eval``, ``train``,
the ``modes`` and the ``cli`` build on, never the other way round. Imports
inside functions count too: deferring an import hides a dependency, it does not
remove it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bb3x_jax"

# Lower number = lower layer; a module may import only its own layer or below.
LAYERS = {
    "errors": 0,
    "sharding": 1, "cringe": 1, "decoding": 1, "data": 1, "model": 1,
    "config": 2,
    "eval": 3, "deploy": 3,
    "train": 4,
    "modes": 5, "cli": 5,
    "experiments": 6,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules) -> set[str]:
    """The project's modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root (``bb3x_jax.load``) stands outside the layers
    return LAYERS.get(parts[1])


def test_every_subpackage_and_top_module_has_a_layer():
    unplaced = sorted({m.split(".")[1] for m in _modules() if m != "bb3x_jax" and _layer(m) is None})
    assert not unplaced, f"modules outside LAYERS: {unplaced}"


def test_no_lower_layer_imports_a_higher_one():
    upward = [f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
              for src, targets in sorted(_graph().items()) for dst in sorted(targets)
              if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("bad", ["cycle", "upward"])
def test_the_checks_see_a_planted_violation(bad, monkeypatch):
    """The walk must find what it is meant to find (a check that cannot fail protects nothing)."""
    real = _graph()
    planted = {k: set(v) for k, v in real.items()}
    if bad == "cycle":
        planted["bb3x_jax.cringe"].add("bb3x_jax.train.step")  # step imports cringe
        monkeypatch.setitem(globals(), "_graph", lambda: planted)
        with pytest.raises(AssertionError, match="bb3x_jax.cringe"):
            test_no_import_cycles()
    else:
        planted["bb3x_jax.data.records"].add("bb3x_jax.modes.train")
        monkeypatch.setitem(globals(), "_graph", lambda: planted)
        with pytest.raises(AssertionError, match="bb3x_jax.data.records"):
            test_no_lower_layer_imports_a_higher_one()
