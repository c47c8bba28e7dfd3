"""Joining a real Ray cluster (``ray start --head`` with token auth, tests/servers.py ``ray_cluster``) by explicit
address: the token is sent, a wrong token is a clear error, a partition whose worker process dies is re-run (and the
stage fails with a clear message once retries run out), and the stage leaves no detached actor behind. The benchmark
grid's two Ray Data actors (each loading the pipeline once) write the local engine's PNG bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.benchmark import run_grid
from ultraflux_data.compute import map_partitions, ray_session
from ultraflux_data.config import ComputeConfig
from ultraflux_model.config import GenerateConfig

pytestmark = pytest.mark.slow


@pytest.fixture()
def cluster_env(ray_cluster, monkeypatch):
    """A client that holds the cluster's token and chose no auth mode (what a user exports)."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the engine sets it for an explicit address; restored after
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster.token)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # the cluster's workers cannot import this test module by name (pytest imports it by path): ship its functions
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _double():
    return lambda partition: partition * 2


class _DieOnceThenWork:
    """A worker whose process dies the first time it sees each partition (a lost node, an OOM kill)."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def __call__(self):
        def work(partition: int) -> int:
            mark = self.marks / str(partition)
            if not mark.exists():
                mark.write_text("died once")
                os._exit(1)  # the process vanishes: no exception, Ray sees a crashed worker
            return partition * 10

        return work


def _alive_detached_actors(address: str) -> list[str]:
    """Detached actors alive on the cluster, seen from a new driver (a later job on the shared cluster)."""
    import ray

    with ray_session(ComputeConfig(engine="ray", address=address)):
        return [a["ActorClassName"] for a in ray._private.state.actors().values()
                if a.get("IsDetached") and a["State"] != "DEAD"]


def test_explicit_address_with_token_auth_runs_a_stage_and_leaves_no_detached_actor(cluster_env):
    compute = ComputeConfig(engine="ray", address=cluster_env.address, workers=2)
    assert map_partitions(_double, [1, 2, 3], compute, gpu=True, progress=False) == [2, 4, 6]  # Ray Data actors
    assert map_partitions(_double, [4, 5], compute, gpu=False, progress=False) == [8, 10]  # tasks
    assert _alive_detached_actors(cluster_env.address) == []  # Ray Data's helpers of our job were removed


def test_a_wrong_token_is_a_clear_error(cluster_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    compute = ComputeConfig(engine="ray", address=cluster_env.address, workers=1)
    with pytest.raises(UltraFluxError, match=r"cannot start or join Ray at compute.address=.*RAY_AUTH_TOKEN"):
        map_partitions(_double, [1], compute, progress=False)


def test_a_lost_worker_is_retried_and_a_clear_error_when_retries_run_out(cluster_env, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    retried = ComputeConfig(engine="ray", address=cluster_env.address, workers=2, task_retries=1)
    assert map_partitions(_DieOnceThenWork(marks), [1, 2], retried, progress=False) == [10, 20]
    assert sorted(p.name for p in marks.iterdir()) == ["1", "2"]  # each died once, then ran again

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    no_retry = ComputeConfig(engine="ray", address=cluster_env.address, workers=1, task_retries=0)
    with pytest.raises(UltraFluxError, match=r"partition 0 lost its Ray worker 1 time.*re-run the stage to resume"):
        map_partitions(_DieOnceThenWork(fresh), [7], no_retry, progress=False)


GRID_SETTINGS = GenerateConfig(steps=1, dtype="fp32")
GRID_PROMPTS = ["a red fox", "a blue boat"]
GRID_ASPECTS = [("1:1", 64, 64), ("2:1", 128, 64)]


def _grid(model, out, compute=None):
    return run_grid(str(model), GRID_PROMPTS, GRID_ASPECTS, [0], GRID_SETTINGS, out, compute, progress=False)


def test_two_ray_workers_write_the_local_engines_pngs(cluster_env, tiny_checkpoint, tmp_path):
    # A Ray actor (num_cpus=1) runs torch on one thread; float32 sums can differ in the last bits between thread
    # counts, so the local run uses one thread too (as tests/data/test_data_ray.py)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = _grid(tiny_checkpoint, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    compute = ComputeConfig(engine="ray", address=cluster_env.address, workers=2)
    on_ray = _grid(tiny_checkpoint, tmp_path / "ray", compute)
    assert (on_ray.generated, on_ray.reused, on_ray.missing) == (4, 0, 0)
    pairs = list(zip(local.images, on_ray.images, strict=True))
    assert [a.image.path.relative_to(tmp_path / "local") for a, _ in pairs] == [
        b.image.path.relative_to(tmp_path / "ray") for _, b in pairs]
    assert all(a.image.path.read_bytes() == b.image.path.read_bytes() for a, b in pairs)
    again = _grid(tiny_checkpoint, tmp_path / "ray", compute)  # finished: no actor is started
    assert (again.generated, again.reused) == (0, 4)
