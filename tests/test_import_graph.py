"""No import cycles between the project's modules, counting every import (module level, in functions, under
``if __name__ == "__main__"``): a cycle makes import order matter and hides layering mistakes. Also the layering
rules of DESIGN §2: the ground floor (``ultraflux_core``) imports no other package of ours, the eval package never
imports the model package, and training never imports the eval package (lineage, runs and the registry live in
``ultraflux_core.tracking``)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

SRC = [Path(__file__).resolve().parents[1] / "packages" / pkg / "src" for pkg in ("ultraflux_core", "ultraflux_model",
                                                                                        "ultraflux_eval")]


def module_files() -> dict[str, Path]:
    files = {}
    for src in SRC:
        for path in src.rglob("*.py"):
            parts = path.relative_to(src).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> nx.DiGraph:
    """Edges module → project module it imports (``from a.b import c`` counts a.b.c when that is a module)."""
    files = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]  # a name inside a module: the module itself
                if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                    graph.add_edge(name, target)
    return graph


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert graph.has_edge("ultraflux_model.cli", "ultraflux_model.training.commands")
    assert graph.has_edge("ultraflux_model.diffusion.losses", "ultraflux_model.kernels.wavelet_loss")  # lazy import


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("ultraflux_eval", "ultraflux_model"),
    ("ultraflux_model.training", "ultraflux_eval"),
    ("ultraflux_core", "ultraflux_eval"),
    ("ultraflux_core", "ultraflux_model"),
])
def test_layering(importer: str, forbidden: str) -> None:
    graph = import_graph()
    bad = sorted((a, b) for a, b in graph.edges if (a == importer or a.startswith(importer + "."))
                 and (b == forbidden or b.startswith(forbidden + ".")))
    assert bad == []
