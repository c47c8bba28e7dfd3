"""Two `ultraflux train` on one run directory (issue 19): the second refuses, naming the first; the ranks of one
job never refuse each other."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from ultraflux.config import UltraFluxConfig
from ultraflux_core.locks import LockHeld
from ultraflux_model.training.trainer import run_dir_lock, train, train_stage


def _cfg(run_dir) -> UltraFluxConfig:
    return UltraFluxConfig.model_validate(
        {
            "train": {"run_dir": str(run_dir), "cache_dir": str(run_dir / "no-cache"), "sample_sizes": []},
            "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db"},
        }
    )


def test_a_second_training_job_on_the_same_run_dir_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    # The first job: another process holding the run directory, as `ultraflux train` does for its whole run.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from ultraflux_model.training.trainer import run_dir_lock
            with run_dir_lock({str(run_dir)!r}):
                print("held", flush=True)
                sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for run in (lambda: train(_cfg(run_dir)), lambda: train_stage(_cfg(run_dir), 0)):
            with pytest.raises(LockHeld, match=rf"train.run_dir .*run \(rank 0\) is in use by pid {holder.pid} on "):
                run()
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "mlflow.db").exists()  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with run_dir_lock(run_dir):  # released with its process
        pass


def test_ranks_of_one_job_take_separate_locks(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("RANK", "0")
    with run_dir_lock(run_dir):
        monkeypatch.setenv("RANK", "1")
        with run_dir_lock(run_dir):  # rank 1 of the same job is not refused by rank 0
            monkeypatch.setenv("RANK", "0")
            with pytest.raises(LockHeld, match="rank 0"):  # but a second rank 0 is
                with run_dir_lock(run_dir):
                    pass
