"""Two `ultraflux data <stage>` processes on one root at once, and a run killed mid-stage, leave exactly the
outputs of one uninterrupted run (score, shard, cache). Learned scorers are off here (they run in
test_data_scoring and the Ray tests): every process start pays for its imports on a shared 2-core machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from ultraflux.config import load_config
from ultraflux_data import stages

pytestmark = pytest.mark.slow

CLI = [str(Path(sys.executable).with_name("ultraflux")), "data"]  # the console script, as a user runs it


def _config(root: Path, model: Path, partition_size: int = 2) -> dict:
    return {
        "data": {
            "root": str(root), "synthetic": {"n": 8, "seed": 2, "base_side": 128},
            "scoring": {"flat_patch": 32, "qalign": "none", "aesthetics": "none"},
            "filter": {"min_long_side": 96, "min_short_side": 64, "min_qalign": None, "aesthetics_top": 1.0,
                       "stage2_top": 0.5},
            "shards": {"samples_per_shard": 2},
            "cache": {"model": str(model), "max_sequence_length": 8, "batch_size": 2},
        },
        "compute": {"partition_size": partition_size},
    }


def _write(tmp: Path, name: str, payload: dict) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(payload))
    return path


def _start(stage: str, config: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, stage, "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _both_succeed(stage: str, config: Path) -> None:
    procs = [_start(stage, config), _start(stage, config)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{stage}: {err[-3000:]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_checkpoint):
    """One uninterrupted in-process run of every stage: the reference outputs."""
    root = tmp_path_factory.mktemp("single")
    cfg = load_config(_write(root, "cfg.yaml", _config(root / "data", tiny_checkpoint)))
    for run in (stages.run_ingest, stages.run_score):
        run(cfg.data, progress=False, compute=cfg.compute)
    stages.run_filter(cfg.data)
    stages.run_bucket(cfg.data)
    stages.run_shard(cfg.data, progress=False, compute=cfg.compute)
    stages.run_cache(cfg.data, progress=False, compute=cfg.compute)
    return stages.DataPaths(root / "data")


def _same_shards(a: stages.DataPaths, b: stages.DataPaths) -> None:
    index = pd.read_parquet(a.shards / "index.parquet")
    pd.testing.assert_frame_equal(index, pd.read_parquet(b.shards / "index.parquet"))
    tars = sorted(p.name for p in a.shards.glob("shard-*.tar"))
    assert tars == sorted(p.name for p in b.shards.glob("shard-*.tar")) and tars
    assert all((a.shards / t).read_bytes() == (b.shards / t).read_bytes() for t in tars)


def _same_cache(a: stages.DataPaths, b: stages.DataPaths) -> None:
    index = pd.read_parquet(a.cache / "index.parquet")
    pd.testing.assert_frame_equal(index, pd.read_parquet(b.cache / "index.parquet"))
    for name in index["file"]:  # same tensors bit for bit and same metadata (the header's key order is not fixed)
        with safe_open(str(a.cache / name), "pt") as one, safe_open(str(b.cache / name), "pt") as two:
            assert one.metadata() == two.metadata() and one.keys() == two.keys()
            assert all(torch.equal(one.get_tensor(k), two.get_tensor(k)) for k in one.keys())
    assert not list(b.cache.rglob("*.tmp")) and not list(b.shards.rglob("*.tmp"))


def test_two_concurrent_runs_of_score_shard_cache_equal_one_run(single, tmp_path, tiny_checkpoint):
    root = tmp_path / "data"
    config = _write(tmp_path, "cfg.yaml", _config(root, tiny_checkpoint))
    cfg = load_config(config)
    shutil.copytree(single.ingest, root / "ingest")
    paths = stages.DataPaths(root)
    _both_succeed("score", config)
    pd.testing.assert_frame_equal(pd.read_parquet(paths.scores), pd.read_parquet(single.scores))
    stages.run_filter(cfg.data)
    stages.run_bucket(cfg.data)
    _both_succeed("shard", config)
    _same_shards(single, paths)
    _both_succeed("cache", config)
    _same_cache(single, paths)


def test_cache_killed_mid_stage_then_rerun_equals_one_run(single, tmp_path, tiny_checkpoint):
    root = tmp_path / "data"
    config = _write(tmp_path, "cfg.yaml", _config(root, tiny_checkpoint))
    shutil.copytree(single.shards, root / "shards")
    paths = stages.DataPaths(root)
    proc = _start("cache", config)
    parts = paths.cache / "parts"
    deadline = time.monotonic() + 300  # a bound on the wait, not the trigger: the trigger is the first part file
    while not list(parts.glob("*/*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its first partition was written"
    written = list(parts.glob("*/*.parquet"))
    shards = len(pd.read_parquet(single.shards / "index.parquet")["shard"].unique())
    assert 0 < len(written) < shards and not (paths.cache / "index.parquet").exists()  # killed mid-stage
    cfg = load_config(config)
    summary = stages.run_cache(cfg.data, progress=False, compute=cfg.compute)
    assert summary.reused >= len(pd.read_parquet(written[0])) and summary.encoded > 0
    _same_cache(single, paths)
