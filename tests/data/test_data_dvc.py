"""`dvc repro` of the repository's data stages in a fresh git + DVC project, pushed to an S3 remote (moto's
standalone server, tests/servers.py) and pulled into a fresh `git clone`; then the preset is switched in its one
place (`preset.yaml`) and DVC re-runs exactly the stages whose resolved keys changed. The project carries the
repository's own `.gitignore`, so what git does not carry (everything under `artifacts/`) must come from DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ultraflux.config import UltraFluxConfig
from ultraflux_core.config import dump_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UP_TO_DATE = "Data and pipelines are up to date."


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _project(root: Path) -> Path:
    """The repository's pipeline files in a new git repository, with the embedded defaults made smaller."""
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "preset.yaml", "configs/tiny.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load(dump_config(UltraFluxConfig()))
    params["data"]["synthetic"].update(n=8, base_side=160)
    params["data"]["scoring"].update(flat_patch=32, qalign="none", aesthetics="none")  # learned scorers: elsewhere
    params["data"]["filter"].update(min_long_side=128, min_short_side=72, min_qalign=None)
    params["data"]["cache"]["max_sequence_length"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # a preset that changes one late setting only: switching to it must re-run the shard stage and what follows
    (root / "configs" / "small-shards.yaml").write_text("data:\n  shards: {samples_per_shard: 1}\n")
    # a preset that changes generation settings only: no data stage may re-run
    (root / "configs" / "generate-only.yaml").write_text("generate:\n  steps: 3\n  guidance: 2.5\n")
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([str(BIN / "dvc"), "init", "-q"], root)
    return root


@pytest.mark.slow
def test_dvc_repro_push_to_s3_pull_into_a_clone_and_switch_preset(tmp_path, moto_s3):
    dvc = str(BIN / "dvc")
    project = _project(tmp_path / "project")
    # the remote as docs/deploy.md sets it up; credentials come from the environment (AWS_* set by the fixture)
    _run([dvc, "remote", "add", "-d", "s3remote", f"s3://{moto_s3.bucket}/dvc"], project)
    _run([dvc, "remote", "modify", "s3remote", "endpointurl", moto_s3.url], project)

    _run([dvc, "repro", "data_cache"], project)  # the target pulls in its whole upstream DAG (data stages only)
    root = project / "artifacts" / "data"
    ingest = json.loads((root / "metrics" / "ingest.json").read_text())
    cache = json.loads((root / "metrics" / "cache.json").read_text())
    shards = json.loads((root / "metrics" / "shard.json").read_text())
    assert ingest["ok"] > 0 and ingest["quarantined"] == 4
    assert cache["entries"] > 0 and cache["encoded"] == cache["entries"]
    resolved = yaml.safe_load((project / "artifacts" / "dvc-params.yaml").read_text())
    assert resolved["generate"]["steps"] == 4  # configs/tiny.yaml, the default preset, was layered
    assert UP_TO_DATE in _run([dvc, "status", "data_cache"], project).stdout
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-q", "-m", "data pipeline"], project)

    _run([dvc, "push", "--with-deps", "data_cache"], project)
    listed = moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix="dvc/")
    assert listed["KeyCount"] > 0

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "artifacts" / "data" / "shards").exists()  # git carries the .dvc pointers, not the data
    _run([dvc, "pull", "--with-deps", "data_cache"], clone)
    assert (clone / "artifacts" / "data" / "shards" / "index.parquet").is_file()
    assert (clone / "artifacts" / "data" / "scores.parquet").is_file()
    assert not _run(["git", "status", "--porcelain"], clone).stdout  # nothing DVC restored shows up in git
    assert UP_TO_DATE in _run([dvc, "status", "--with-deps", "data_cache"], clone).stdout
    assert (clone / "artifacts" / "data" / "metrics" / "shard.json").is_file()  # metrics come back with the data

    # a preset that changes only generation settings re-runs no data stage
    out = _run([dvc, "exp", "run", "-S", "preset.yaml:preset=configs/generate-only.yaml", "data_cache"], clone).stdout
    for skipped in ("tiny_model", "data_ingest", "data_score", "data_filter", "data_bucket", "data_shard",
                    "data_cache"):
        assert f"Stage '{skipped}' didn't change" in out, out
    assert "Running stage 'data_" not in out, out
    _run(["git", "checkout", "-q", "--", "."], clone)  # back to the committed preset and dvc.lock

    # switch the preset in its one place, the documented way (params.yaml untouched)
    params_before = (clone / "params.yaml").read_text()
    out = _run([dvc, "exp", "run", "-S", "preset.yaml:preset=configs/small-shards.yaml", "data_cache"], clone).stdout
    assert (clone / "params.yaml").read_text() == params_before
    for skipped in ("data_ingest", "data_score", "data_filter", "data_bucket"):
        assert f"Stage '{skipped}' didn't change" in out, out
    assert "Running stage 'data_shard'" in out, out
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert lock["stages"]["data_shard"]["params"]["artifacts/dvc-params.yaml"]["data.shards"]["samples_per_shard"] == 1
    after = json.loads((clone / "artifacts" / "data" / "metrics" / "shard.json").read_text())
    assert after != shards  # the stage saw the preset's value
