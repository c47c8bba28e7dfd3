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
outputs are identical.
"""

from __future__ import annotations

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
    (``address`` None, ``workers`` CPUs, no dashboard) or joins ``address`` (``auto`` / ``ray://host:port``),
    and shuts down what it started.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    try:
        if compute.address is None:  # "local": a new instance, never a cluster another user started on this node
            ray.init(address="local", num_cpus=compute.workers, **kwargs)
        else:
            ray.init(address=compute.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UltraFluxError(
            f"cannot start or join Ray at compute.address={compute.address!r}: {err}; set compute.address to "
            "'auto' on a cluster node, 'ray://host:10001' for a remote cluster, or null to start a local instance"
        ) from err
    try:
        yield
    finally:
        ray.shutdown()


def _run_task(make_worker: WorkerFactory, partition: Any) -> Any:
    return make_worker()(partition)


def _ray_tasks(make_worker: WorkerFactory, partitions: list[Any], compute: ComputeConfig, bar: tqdm) -> list[Any]:
    """One CPU task per partition, at most ``workers`` in flight (bounded memory on the driver and the store)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(_run_task)
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
            results[in_flight.pop(ref)] = ray.get(ref)
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
        num_cpus=1,
    )
    results: list[Any] = [None] * len(partitions)
    for row in dataset.iter_rows():
        results[int(row["index"])] = pickle.loads(row["result"])
        bar.update()
    return results
