"""Run a per-partition function over partitions, in this process or on Ray (the ``compute`` config section).

A stage hands :func:`map_partitions` a picklable *worker factory* (``make_worker() -> worker``; building a worker
may load models) and a list of partitions; ``worker(partition)`` does one partition's work, writes its output
atomically and returns a small summary. The engine only decides where the calls run:

- ``local``: one worker in this process, partitions in order.
- ``ray``, ``gpu=False`` (download, ingest, shard: plain fan-out): one Ray task per partition, at most
  ``workers`` in flight; each task builds its (cheap) worker.
- ``ray``, ``gpu=True`` (score, cache: learned scorers and encoders): Ray Data ``map_batches`` over the
  partitions with a pool of ``workers`` actors, each holding ``gpus_per_worker`` GPUs and building its worker
  (models) once; one partition per batch so a partition's output is written by exactly one call.

Results come back in partition order whichever engine ran them, and the same worker code ran them, so the
outputs are identical. A task partition whose Ray worker process (or node) dies is re-run up to ``task_retries``
times (partitions are idempotent); an exception raised by the worker code itself is not retried. Actor-pool stages
rely on Ray Data's own actor restarts. Joining a cluster leaves
nothing behind: the detached helper actors Ray Data creates for this job are killed when the stage ends.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm
from ultraflux_core.errors import UltraFluxError

from ultraflux_data.config import ComputeConfig

WorkerFactory = Callable[[], Callable[[Any], Any]]


def map_partitions(make_worker: WorkerFactory, partitions: Sequence[Any], compute: ComputeConfig | None = None, *,
                   gpu: bool = False, desc: str = "partitions", progress: bool = True) -> list[Any]:
    """``[make_worker()(p) for p in partitions]``, run by ``compute.engine``; results in partition order."""
    compute = compute or ComputeConfig()
    if not partitions:
        return []
    bar = tqdm(total=len(partitions), desc=desc, unit="part", disable=not progress)
    try:
        if compute.engine == "local":
            worker = make_worker()
            results = []
            for partition in partitions:
                results.append(worker(partition))
                bar.update()
            return results
        with ray_session(compute):
            run = _ray_actor_pool if gpu else _ray_tasks
            return run(make_worker, list(partitions), compute, bar)
    finally:
        bar.close()


@contextmanager
def ray_session(compute: ComputeConfig) -> Iterator[None]:
    """Connect to Ray for the duration of a stage.

    Reuses an already initialised Ray (a test fixture, a notebook); otherwise starts a local instance
    (``address`` None, ``workers`` CPUs, no dashboard) or joins ``address`` (``auto``, ``host:port``,
    ``ray://host:port``; with the cluster's token when it uses token auth), and shuts down what it started.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    with _cluster_auth(compute.address):
        try:
            if compute.address is None:  # "local": a new instance, never a cluster another user started on this node
                ray.init(address="local", num_cpus=compute.workers, **kwargs)
            else:
                ray.init(address=compute.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UltraFluxError(
                f"cannot start or join Ray at compute.address={compute.address!r}: {err}; set compute.address to "
                "'auto' on a cluster node, 'host:6379' or 'ray://host:10001' for a remote cluster (with token auth: "
                "export RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), or "
                "null to start a local instance"
            ) from err
        try:
            yield
        finally:
            if compute.address is not None:
                _kill_detached_actors_of_this_job()
            ray.shutdown()


@contextmanager
def _cluster_auth(address: str | None) -> Iterator[None]:
    """Send the cluster token when joining by explicit address, and leave Ray's process-wide auth state as found.

    ``ray start`` heads use token auth by default; ``address='auto'`` learns that from the local session, but an
    explicit ``host:port`` connects without a token unless ``RAY_AUTH_MODE=token`` (Ray then reads
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Set it when a token is available and the
    user chose no mode; restore it afterwards so a later local instance in this process starts without auth.
    """
    default_token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.isfile(
        default_token)
    if address in (None, "auto") or not has_token or "RAY_AUTH_MODE" in os.environ:
        yield
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    _reload_ray_auth()
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads its auth mode and token once per process (then caches them): make it re-read them. Private API: if
    it moves, exporting RAY_AUTH_MODE=token before the process starts still works (the join error says so)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def _kill_detached_actors_of_this_job() -> None:
    """Ray Data creates detached helper actors (stats, autoscaling coordination) that outlive the driver on a
    shared cluster; kill the ones this job created (only those: other jobs may be using theirs)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    ours = {info["ActorID"] for info in ray._private.state.actors().values()  # the GCS actor table (no dashboard)
            if info.get("IsDetached") and info.get("State") != "DEAD" and info.get("JobID") == job}
    for named in ray.util.list_named_actors(all_namespaces=True):
        try:
            handle = ray.get_actor(named["name"], namespace=named["namespace"])
        except ValueError:  # gone meanwhile
            continue
        if handle._actor_id.hex() in ours:
            ray.kill(handle)


def _lost_worker(partition: int, compute: ComputeConfig, err: Exception) -> UltraFluxError:
    """The error for a partition whose Ray worker died more often than ``compute.task_retries`` allows."""
    return UltraFluxError(
        f"partition {partition} lost its Ray worker {compute.task_retries + 1} time(s) ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}); the partitions already written are kept: re-run the stage to resume, "
        "or raise compute.task_retries"
    )


def _run_task(make_worker: WorkerFactory, partition: Any) -> Any:
    return make_worker()(partition)


def _ray_tasks(make_worker: WorkerFactory, partitions: list[Any], compute: ComputeConfig, bar: tqdm) -> list[Any]:
    """One CPU task per partition, at most ``workers`` in flight (bounded memory on the driver and the store)."""
    import ray
    from ray.exceptions import ActorDiedError, NodeDiedError, WorkerCrashedError

    # system failures (the worker process or its node died) are retried; exceptions of the worker code are not
    remote = ray.remote(num_cpus=1, max_retries=compute.task_retries, retry_exceptions=False)(_run_task)
    factory_ref = ray.put(make_worker)
    results: list[Any] = [None] * len(partitions)
    in_flight: dict[Any, int] = {}
    queue = list(enumerate(partitions))
    while queue or in_flight:
        while queue and len(in_flight) < compute.workers:
            index, partition = queue.pop(0)
            in_flight[remote.remote(factory_ref, partition)] = index
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            index = in_flight.pop(ref)
            try:
                results[index] = ray.get(ref)
            except (WorkerCrashedError, NodeDiedError, ActorDiedError) as err:
                for pending in in_flight:
                    ray.cancel(pending, force=True)
                raise _lost_worker(index, compute, err) from err
            bar.update()
    return results


class _PartitionActor:
    """Ray Data actor: builds the worker (models) once, then runs one pickled partition per batch."""

    def __init__(self, make_worker: WorkerFactory) -> None:
        self.worker = make_worker()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        results = [pickle.dumps(self.worker(pickle.loads(payload))) for payload in batch["payload"]]
        return {"index": list(batch["index"]), "result": results}


def _ray_actor_pool(make_worker: WorkerFactory, partitions: list[Any], compute: ComputeConfig,
                    bar: tqdm) -> list[Any]:
    """Ray Data over the partitions with a fixed pool of ``workers`` actors of ``gpus_per_worker`` GPUs each.

    Partitions travel pickled (bytes columns), so any picklable partition description works with Arrow blocks.
    """
    import ray

    items = [{"index": i, "payload": pickle.dumps(p)} for i, p in enumerate(partitions)]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _PartitionActor, fn_constructor_kwargs={"make_worker": make_worker}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=compute.workers), num_gpus=compute.gpus_per_worker or None,
        num_cpus=1,  # a dying actor is restarted and its batch retried by Ray Data itself (its default policy)
    )
    results: list[Any] = [None] * len(partitions)
    for row in dataset.iter_rows():
        results[int(row["index"])] = pickle.loads(row["result"])
        bar.update()
    return results
