"""The layering of the monorepo, checked on the transitive import graph (every import counts: module level, inside
functions, under ``if TYPE_CHECKING`` or ``__main__``). The allowed directions are written once, below; one arrow
that runs back up fails CI. No exceptions are listed, on purpose.

Packages, bottom to top (docs/design.md § Layout):

    ultraflux_core   the ground floor: errors, config machinery, CLI options, files, MLflow plumbing
    ultraflux_model  the model (its app/ room may also use the metrics package: the Studio's A/B scores)
    ultraflux_eval   metrics: images + prompts in, numbers out
    ultraflux_data   curation (and the jobs that need model and metrics together: filters, VAE post-training)
    ultraflux        the root config tree and the CLI composition
    flows            Prefect flows over everything

Inside the model package the rooms are ranked; a module imports only rooms of its own rank or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = [*sorted(REPO.glob("packages/*/src")), REPO]  # flows/ is imported as a top-level package from the repo

# Which packages each package may import (besides itself). A prefix names a package or one of its rooms; the
# longest matching prefix decides.
ALLOWED: dict[str, set[str]] = {
    "ultraflux_core": set(),
    "ultraflux_model": {"ultraflux_core"},
    "ultraflux_model.app": {"ultraflux_core", "ultraflux_eval"},  # a top room: the Studio scores A and B
    "ultraflux_eval": {"ultraflux_core"},
    "ultraflux_data": {"ultraflux_core", "ultraflux_model", "ultraflux_eval"},
    "ultraflux": {"ultraflux_core", "ultraflux_model", "ultraflux_eval", "ultraflux_data"},
    "flows": {"ultraflux_core", "ultraflux_model", "ultraflux_eval", "ultraflux_data", "ultraflux"},
}

# The model package's rooms, bottom to top; an import may go to the same rank or lower.
MODEL_RANKS: list[tuple[str, ...]] = [
    ("ultraflux_model.config", "ultraflux_model.dtypes", "ultraflux_model.buckets"),
    ("ultraflux_model.kernels",),
    # the strict loading mixin the model classes are built on; the files of a checkpoint, none outside it
    ("ultraflux_model.checkpoint.loading", "ultraflux_model.checkpoint.files"),
    ("ultraflux_model.modules", "ultraflux_model.vae", "ultraflux_model.diffusion"),
    ("ultraflux_model.release.manifest", "ultraflux_model.release.fetch",  # the storage format and the way back
     "ultraflux_model.release.aliases"),
    ("ultraflux_model.checkpoint",),  # resolve (incl. models:/), layout, convert, tiny
    ("ultraflux_model.release",),  # assembling a release from checkpoints
    ("ultraflux_model.lora",),  # LoRA adapters: targets, the adapter folder (the trainer writes, inference applies)
    ("ultraflux_model.inference",),
    ("ultraflux_model.training",),  # a trainer samples (inference) at its exports
    ("ultraflux_model.serving",),
    ("ultraflux_model.app",),
    ("ultraflux_model",),  # the package's own __init__ (lazy attribute access to the model classes)
]

# Leaves: what these may import of ours, and nothing else (hyper-parameters arrive as arguments).
LEAVES: dict[str, set[str]] = {"ultraflux_model.kernels": {"ultraflux_model.kernels", "ultraflux_core.errors"}}


def module_files() -> dict[str, Path]:
    files = {}
    for root in ROOTS:
        tops = [root / "flows"] if root == REPO else [p for p in root.iterdir() if p.is_dir()]
        for top in tops:
            for path in top.rglob("*.py"):
                parts = path.relative_to(root).with_suffix("").parts
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


def _longest(prefixes: list[str] | dict[str, object], module: str) -> str | None:
    matches = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def _rank(module: str) -> int | None:
    flat = {prefix: rank for rank, group in enumerate(MODEL_RANKS) for prefix in group}
    prefix = _longest(list(flat), module)
    return None if prefix is None else flat[prefix]


def layering_violations(graph: nx.DiGraph) -> list[str]:
    """Every edge that breaks a rule, as ``importer -> imported (rule)``."""
    bad = []
    for a, b in graph.edges:
        package_a, package_b = _longest(ALLOWED, a), _longest(ALLOWED, b)
        top_b = b.split(".")[0]
        if package_a is None or package_b is None:
            bad.append(f"{a} -> {b} (a module outside the known packages)")
        elif top_b != a.split(".")[0] and not any(top_b == p or b.startswith(p + ".") for p in ALLOWED[package_a]):
            bad.append(f"{a} -> {b} ({package_a} may import only {sorted(ALLOWED[package_a]) or 'nothing of ours'})")
        leaf = _longest(LEAVES, a)
        if leaf is not None and not any(b == p or b.startswith(p + ".") for p in LEAVES[leaf]):
            bad.append(f"{a} -> {b} ({leaf} is a leaf: it imports only {sorted(LEAVES[leaf])})")
        if a.startswith("ultraflux_model") and b.startswith("ultraflux_model"):
            rank_a, rank_b = _rank(a), _rank(b)
            if rank_a is None or rank_b is None:
                bad.append(f"{a} -> {b} (a model room missing from MODEL_RANKS)")
            elif rank_b > rank_a:
                bad.append(f"{a} -> {b} (runs back up: rank {rank_a} imports rank {rank_b})")
    return sorted(bad)


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert graph.has_edge("ultraflux.cli", "ultraflux.train_cli")
    assert graph.has_edge("ultraflux_model.diffusion.losses", "ultraflux_model.kernels.wavelet_loss")  # lazy import
    assert graph.has_edge("flows.pipeline", "flows.data_flow")
    assert graph.has_edge("ultraflux_data.cache", "ultraflux_model.training.latent_cache")


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_layering_has_no_exceptions() -> None:
    assert layering_violations(import_graph()) == []


@pytest.mark.parametrize(("importer", "imported", "rule"), [
    ("ultraflux_model.training.trainer", "ultraflux_data.cache", "may import only"),
    ("ultraflux_eval.metrics.scores", "ultraflux_model.config", "may import only"),
    ("ultraflux_model.inference.pipeline", "ultraflux_eval.errors", "may import only"),
    ("ultraflux_core.config", "ultraflux_model.config", "may import only"),
    ("ultraflux_model.kernels.wavelet_loss", "ultraflux_model.config", "is a leaf"),
    ("ultraflux_model.vae.autoencoder", "ultraflux_model.inference.pipeline", "runs back up"),
    ("ultraflux_model.training.trainer", "ultraflux_model.app.engine", "runs back up"),
])
def test_a_back_arrow_is_caught(importer: str, imported: str, rule: str) -> None:
    """The rules bite: one added arrow of each kind is reported (the checker cannot pass vacuously)."""
    graph = nx.DiGraph([(importer, imported)])
    assert [line for line in layering_violations(graph) if rule in line], layering_violations(graph)
