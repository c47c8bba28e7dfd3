"""The process-pool deployments chained as an operator runs them: data-pipeline → train-sacl (killed mid-stage) →
train-sacl (resumes) → release → eval-latest-nightly, each a separate deployment run on a real `prefect server`
and a real process worker, each in its own throwaway git clone.

What it proves: outputs land under the absolute shared roots (`roots`, defaulted from $ULTRAFLUX_SHARED_ROOT at
deploy time) and survive the clone; a killed training run continues from its checkpoint in the next run; the
runs execute the commit `prefect deploy` ran from, with the library imported from that clone, even after the
branch moves on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.code_snapshot import git_commit, git_snapshot

DEPLOYMENTS = ("data-pipeline", "train-sacl", "release", "eval-latest-nightly")
# The tiny defaults made smaller still: few samples, two short stages, checkpoints every 2 steps, one prompt.
STAGES = ("train.stages=[{name: stage1, subset: all, t_min: 0.0, t_max: 1.0, steps: 12, lr: 0.001, micro_batch: 2,"
          " global_batch: 2}, {name: stage2, subset: stage2, t_min: 0.541, t_max: 1.0, steps: 2, lr: 0.0005,"
          " micro_batch: 1, global_batch: 2}]")
OVERRIDES = ["data.synthetic.n=8", STAGES, "train.checkpoint.every=2",
             "train.sample_every=0", "eval.benchmark.prompts=[a red fox in snow]",
             "eval.benchmark.aspect_ratios=[{name: '1:1', width: 64, height: 64}]",
             "eval.benchmark.metrics=[glcm,clip_score]", "eval.promotion.metric=glcm/overall",
             "generate.steps=2", "generate.dtype=fp32"]


def _prefect(env: dict[str, str], *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _run(env: dict[str, str], flow: str, deployment: str, params: dict, cwd: Path) -> str:
    out = _prefect(env, "deployment", "run", f"{flow}/{deployment}", "--params", json.dumps(params), cwd=cwd)
    return out.split("UUID:")[1].split()[0]


def _work_once(env: dict[str, str], cwd: Path) -> None:
    """One process worker that runs the scheduled flow run and exits (bounded); its log is kept beside ``cwd``."""
    out = _prefect(env, "worker", "start", "--pool", "ultraflux-process", "--run-once", cwd=cwd)
    with open(cwd.parent / "worker.log", "a") as log:
        log.write(out)


def _flow_run_processes(run_id: str) -> list[int]:
    """The PIDs executing flow run ``run_id``: the process worker's child carries PREFECT__FLOW_RUN_ID."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ:
            found.append(int(proc.name))
    return found


STATES = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
async def main(ids):
    async with get_client() as client:
        print(json.dumps({i: (await client.read_flow_run(i)).state.type.value for i in ids}))
asyncio.run(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_chained_deployments_keep_outputs_and_resume_a_killed_run(tmp_path, prefect_server):
    started = time.monotonic()
    src = tmp_path / "src"
    shared = tmp_path / "shared"
    env = {k: v for k, v in {**prefect_server, **git_snapshot(src)}.items()
           if k not in ("MLFLOW_TRACKING_URI", "ULTRAFLUX_MODEL_CACHE")}
    env["ULTRAFLUX_SHARED_ROOT"] = str(shared)
    work = tmp_path / "worker"  # where the commands run (each flow run clones into its own temporary folder)
    work.mkdir()
    _prefect(env, "work-pool", "create", "ultraflux-process", "--type", "process", cwd=src)
    names = [arg for name in DEPLOYMENTS for arg in ("--name", name)]
    _prefect(env, "--no-prompt", "deploy", *names, cwd=src)  # pins the snapshot's commit
    # The branch moves on after the deploy with a commit that would break every flow: the deployments must not see it.
    (src / "flows" / "data_flow.py").write_text("raise SystemExit('not the deployed commit')\n")
    (src / "packages" / "ultraflux" / "src" / "ultraflux" / "deploy.py").write_text("raise SystemExit('moved')\n")
    git_commit(src, "a later commit")

    runs = shared / "runs"
    data = _run(env, "ultraflux-data", "data-pipeline", {"overrides": OVERRIDES, "init_tiny": True}, work)
    _work_once(env, work)
    assert json.loads((shared / "data" / "metrics" / "cache.json").read_text())["entries"] > 0
    assert (shared / "models" / "tiny-ultraflux" / "model_index.json").is_file()

    # Training, killed (SIGKILL of the flow-run process, as a lost node) once its first checkpoint is on disk.
    killed = _run(env, "ultraflux-train", "train-sacl", {"overrides": OVERRIDES}, work)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ultraflux-process",
                               "--run-once"], cwd=work, env=env, stdout=open(tmp_path / "killed-worker.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    latest = runs / "train" / "stage1" / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 400
        while not latest.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = _flow_run_processes(killed)
        assert latest.exists() and pids, (tmp_path / "killed-worker.log").read_text(errors="replace")[-5000:]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=120)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
    metrics = runs / "train" / "stage1" / "metrics.jsonl"
    killed_rows = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert not (runs / "train" / "stage1" / "DONE").exists() and max(killed_rows) < 12, "the kill came too late"

    resumed = _run(env, "ultraflux-train", "train-sacl", {"overrides": OVERRIDES}, work)  # resume: true (default)
    _work_once(env, work)
    rows = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert rows.count(1) == 1, "the resumed run started over instead of continuing from its checkpoint"
    assert sorted(set(rows)) == list(range(1, 13))
    assert (runs / "train" / "stage2" / "export" / "transformer" / "config.json").is_file()

    release = _run(env, "ultraflux-release", "release", {"overrides": OVERRIDES}, work)
    _work_once(env, work)
    releases = sorted((shared / "releases").glob("ultraflux-*"))
    assert len(releases) == 1 and (releases[0] / "model_index.json").is_file()

    nightly = _run(env, "ultraflux-eval", "eval-latest-nightly", {"overrides": OVERRIDES}, work)
    _work_once(env, work)
    states = subprocess.run([sys.executable, "-c", STATES, data, killed, resumed, release, nightly], env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    assert list(json.loads(states.stdout).values()) == ["COMPLETED", "CRASHED", "COMPLETED", "COMPLETED",
                                                        "COMPLETED"]
    assert list((runs / "eval" / "nightly" / "images").rglob("*.png"))
    from ultraflux_core.tracking.uri import client_for

    client = client_for(f"sqlite:///{runs / 'mlflow.db'}")  # the runs root's store, shared by every run
    assert str(client.get_model_version_by_alias("ultraflux", "champion").version) == "1"
    print(f"chained deployment test: {time.monotonic() - started:.0f} s")
