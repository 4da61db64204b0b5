"""The import contract in pyproject.toml: each stage of runtime/ imports only the stages below it (the
layers of runtime/__init__.py), checked by import-linter, and no modules import each other in a
circle (the op registry, which imports the ops that register themselves, aside)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
LAYERS = [[name.strip() for name in layer.split("|")] for layer in CONTRACT["contracts"][0]["layers"]]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*CONTRACT["root_packages"], cache_dir=None)


def _layer(module: str) -> int | None:
    """The index of the module's layer, counted from the top (the CLI is 0)."""
    for index, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return index
    return None


def back_arrows(graph: grimp.ImportGraph) -> list[str]:
    """Imports of a higher layer by a lower one, and between two independent siblings of a layer."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            a, b = _layer(importer), _layer(imported)
            if a is None or b is None:
                continue
            sibling = a == b and _package(importer, a) != _package(imported, b)
            if b < a or sibling:
                found.append(f"{importer} -> {imported}")
    return found


def _package(module: str, layer: int) -> str:
    return next(n for n in LAYERS[layer] if module == n or module.startswith(n + "."))


def circles(graph: grimp.ImportGraph) -> list[list[str]]:
    g = nx.DiGraph((m, i) for m in graph.modules for i in graph.find_modules_directly_imported_by(m))
    registry = ("lmspec.compiler.registry", "lmspec.compiler.ops")
    return [c for c in nx.simple_cycles(g) if not all(m.startswith(registry) for m in c)]


def test_import_linter_keeps_the_contract():
    from importlinter.cli import lint_imports
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def test_no_stage_imports_a_stage_above_it(graph):
    assert back_arrows(graph) == []


def test_a_new_back_arrow_would_be_caught():
    graph = grimp.build_graph(*CONTRACT["root_packages"], cache_dir=None)  # a copy to add imports to
    graph.add_import(importer="lmspec.runtime.data.corpus", imported="lmspec.runtime.cli.main")
    graph.add_import(importer="lmspec.runtime.data.corpus", imported="lmspec.runtime.distributed.world")
    assert back_arrows(graph) == ["lmspec.runtime.data.corpus -> lmspec.runtime.cli.main",
                                  "lmspec.runtime.data.corpus -> lmspec.runtime.distributed.world"]


def test_nothing_imports_in_a_circle(graph):
    assert circles(graph) == []
