"""The mutation list stays applicable: every anchor occurs exactly once and every listed test path exists.

Cheap (reads files only), so a refactor that breaks an anchor fails `make test` with the entry to re-anchor,
before `make mutants` runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("run.py")


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("mutation_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_to_the_current_source(runner):
    mutations = runner.load()
    assert len(mutations) >= 15
    assert [p for p in map(runner.anchor_problem, mutations) if p] == []
    areas = {m.file.split("/")[-1] for m in mutations}
    for module in ("trainer.py", "rope.py", "autoencoder.py", "losses.py", "wavelet_loss.py", "filters.py",
                   "ingest.py", "evaluate.py", "registry.py", "curriculum.py"):
        assert module in areas, module


def test_missing_or_ambiguous_anchor_is_named(runner, tmp_path):
    (tmp_path / "m.py").write_text("x = 1\nx = 1\n")
    (tmp_path / "t.py").write_text("")
    make = lambda old: runner.Mutation("m", "what", "m.py", old, "y", ("t.py",))  # noqa: E731
    assert "anchor not found" in runner.anchor_problem(make("z = 2"), tmp_path)
    assert "anchor not unique (2 occurrences)" in runner.anchor_problem(make("x = 1"), tmp_path)
    assert runner.anchor_problem(make("x = 1\nx"), tmp_path) is None
