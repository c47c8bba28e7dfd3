"""Shared roots (where a deployment's outputs go) and the pull step that imports the library from the clone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from ultraflux.config import resolve_config
from ultraflux.deploy import SharedRoots, with_roots

REPO = Path(__file__).resolve().parents[2]


def test_roots_must_be_absolute() -> None:
    with pytest.raises(ValidationError, match="relative: a shared root must be absolute"):
        SharedRoots(data="shared/data")


def test_every_artifacts_path_moves_onto_its_root(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ULTRAFLUX_MODEL_CACHE", raising=False)
    roots = SharedRoots(data=tmp_path / "d", runs=tmp_path / "r", releases=tmp_path / "rel", models=tmp_path / "m")
    overrides = with_roots([str(REPO / "params.yaml")], ["vae_train.out=/elsewhere/vae"], roots)
    cfg = resolve_config([str(REPO / "params.yaml")], overrides)
    assert cfg.data.root == tmp_path / "d" and cfg.train.cache_dir == tmp_path / "d" / "cache"
    assert cfg.vae_train.images == tmp_path / "d" / "ingest" / "images"
    assert cfg.train.run_dir == tmp_path / "r" / "train" and str(cfg.generate.out) == str(tmp_path / "r" / "generated")
    models = {str(cfg.train.model), str(cfg.data.cache.model), str(cfg.generate.model)}
    assert models == {str(tmp_path / "m" / "tiny-ultraflux")}
    assert str(cfg.vae_train.out) == "/elsewhere/vae"  # the user's own override still wins
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}"
    assert cfg.eval.backbones.weights_dir == Path("storage/eval-weights")  # not an artifacts/ output: unchanged
    assert os.environ["ULTRAFLUX_MODEL_CACHE"] == str(tmp_path / "m" / "cache")
    assert roots.rebase("artifacts/release") == str(tmp_path / "rel")
    assert roots.rebase("artifacts/eval/nightly") == str(tmp_path / "r" / "eval" / "nightly")
    assert SharedRoots(data=tmp_path).rebase("artifacts/train") == "artifacts/train"  # no runs root: unchanged
    assert with_roots(None, ["a.b=1"], None) == ["a.b=1"]


def test_use_checkout_imports_the_clone_s_library(tmp_path) -> None:
    """A fresh interpreter that already imported the installed ``ultraflux`` loads the clone's after the step."""
    pkg = tmp_path / "clone" / "packages" / "ultraflux" / "src" / "ultraflux"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("FROM_CLONE = True\n")
    (pkg / "config.py").write_text("WHERE = 'clone'\n")
    code = ("import ultraflux.deploy as d, os, sys; d.use_checkout(sys.argv[1]); import ultraflux.config as c; "
            "print(c.WHERE, os.environ['PYTHONPATH'].split(os.pathsep)[0])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "clone")], capture_output=True, text=True,
                          timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["clone", str(pkg.parent)]
    from ultraflux.deploy import use_checkout
    from ultraflux_core.errors import UltraFluxError

    with pytest.raises(UltraFluxError, match="no packages"):
        use_checkout(str(tmp_path))
