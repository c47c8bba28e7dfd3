"""`dvc repro` of the repository's data stages in a fresh DVC project, then push/pull through a local remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ultraflux_model.config import UltraFluxConfig, dump_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_dvc_repro_push_pull_on_synthetic_data(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    # The embedded defaults, made smaller so the whole data DAG runs in well under a minute.
    params = yaml.safe_load(dump_config(UltraFluxConfig()))
    params["data"]["synthetic"].update(n=8, base_side=160)
    params["data"]["scoring"].update(flat_patch=32, qalign="none", aesthetics="none")  # learned scorers: elsewhere
    params["data"]["filter"].update(min_long_side=128, min_short_side=72, min_qalign=None)
    params["data"]["cache"]["max_sequence_length"] = 8
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], project)
    _run([dvc, "remote", "add", "-d", "local", "storage/dvc-remote"], project)

    _run([dvc, "repro", "data_cache"], project)  # the target pulls in its whole upstream DAG (data stages only)
    root = project / "artifacts" / "data"
    ingest = json.loads((root / "metrics" / "ingest.json").read_text())
    cache = json.loads((root / "metrics" / "cache.json").read_text())
    assert ingest["ok"] > 0 and ingest["quarantined"] == 4
    assert cache["entries"] > 0 and cache["encoded"] == cache["entries"]
    assert (project / "dvc.lock").is_file()
    assert "up to date" in _run([dvc, "status", "data_cache"], project).stdout

    _run([dvc, "push", "data_cache"], project)
    shutil.rmtree(root / "shards")
    (root / "scores.parquet").unlink()
    _run([dvc, "pull", "--with-deps", "data_cache"], project)
    assert (root / "shards" / "index.parquet").is_file() and (root / "scores.parquet").is_file()
    assert "up to date" in _run([dvc, "status", "data_cache"], project).stdout
