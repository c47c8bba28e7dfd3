"""``ultraflux serve``: online generation on Ray Serve, with the served pyfunc model's request and response schema.

Two deployments (docs/deploy.md, "Ray Serve"):

- ``UltraFluxGenerator``: loads the model once per replica (directory, hub id or ``models:/…`` through
  :func:`~ultraflux_model.checkpoint.resolve.resolve_checkpoint`) and generates with the pyfunc model's own code
  (:func:`~ultraflux_model.serving.pyfunc.predict_requests`), so both servers answer the same bytes. Replicas (or
  autoscaling bounds), GPUs per replica, ``max_ongoing_requests`` and ``max_queued_requests`` come from the
  ``ray_serve`` section.
- ``UltraFluxApi``: the HTTP front (FastAPI, no GPU). Every request passes the one request guard
  (:func:`~ultraflux_model.serving.pyfunc.parse_requests`) before it is queued; a full queue answers HTTP 429 with
  one line; status calls never wait behind a generation.

Routes::

    POST   /invocations       {"dataframe_records": [...]} or {"dataframe_split": {...}}  ->  {"predictions": [...]}
    POST   /jobs              the same body  ->  202 {"job_id": ...}   (long 4K jobs)
    GET    /jobs/{id}         state (queued, running, done, failed, cancelled, rejected), image and step progress
    GET    /jobs/{id}/result  {"predictions": [...]} once done
    DELETE /jobs/{id}         cancel: a queued job never starts, a running one stops at its next step
    GET    /health

A job is held by Ray: one named, detached :class:`Job` actor per job (its state, step progress, result and cancel
flag; it removes itself ``job_ttl_s`` after it ends) and the Serve request that runs it on a generator replica. A
synchronous request whose client disconnected stops at its next denoising step; a cancelled job at the first step
after its replica hears of the cancel (it asks at least every ``PROGRESS_EVERY_S``). The replica slot is held until
that step is done, so the next request never shares the device with the one being stopped.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time, through
# Serve's ingress wrapper, where postponed (string) annotations do not resolve and every POST answered 422.
import asyncio
import contextlib
import functools
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import GenerateConfig, RayServeConfig, ServeConfig
from ultraflux_model.inference.stop import Cancelled, Stopped
from ultraflux_model.serving.pyfunc import (
    load_served_adapters,
    parse_requests,
    predict_requests,
    release_accel,
    serving_config,
    signature,
)

logger = logging.getLogger(__name__)

APP_NAME = "ultraflux"
JOB_NAMESPACE = "ultraflux-jobs"  # where the detached job actors are named
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# A rejection by the queue comes back within milliseconds of the handle call (Ray Serve checks the queue before it
# looks for a replica): a submit waits this long for it, so a full queue answers 429 instead of a job id.
ADMISSION_WAIT_S = 0.5
RETRY_AFTER_S = 5
PROGRESS_EVERY_S = 0.2  # a job's progress (and its cancel flag) is exchanged at most this often, and every last step


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the scoring server's shape (``error_code`` + one-line ``message``)."""
    return JSONResponse({"error_code": code, "message": message}, status_code=status, headers=headers)


def no_job(job_id: str) -> JSONResponse:
    """A job route's answer for an id that names no job (never made, or expired)."""
    return error(404, "RESOURCE_DOES_NOT_EXIST", f"no job {job_id} (unknown or expired)")


def busy(max_queued: int) -> JSONResponse:
    return error(429, "RESOURCE_EXHAUSTED",
                 f"the server is busy: every replica is generating and {max_queued} requests already wait "
                 f"(ray_serve.max_queued_requests); retry in a few seconds",
                 {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


@ray.remote(num_cpus=0)
class Job:
    """One asynchronous job: state, progress, result and cancel flag (an async actor: its calls never block)."""

    def __init__(self, images: int, ttl_s: float) -> None:
        self.info: dict[str, Any] = {"state": "queued", "images": images, "image": 0, "phase": None, "step": 0,
                                     "steps": 0, "replica": None, "error": None}  # fmt: skip
        self.rows: list[dict[str, Any]] | None = None
        self.cancel_requested = False
        self.ttl_s = ttl_s

    async def start(self, replica: str) -> bool:
        """Called by the replica before it generates; False: the job was cancelled while it waited."""
        if self.cancel_requested:
            await self.end("cancelled", "cancelled before it started")
            return False
        self.info.update(state="running", replica=replica)
        return True

    async def progress(self, image: int, phase: str, done: int, total: int) -> bool:
        """Record a step; returns whether the job should stop (a cancel was asked for)."""
        self.info.update(image=image + 1, phase=phase, step=done, steps=total)
        return self.cancel_requested

    async def finish(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        await self.end("done", None)

    async def end(self, state: str, message: str | None) -> None:
        if self.info["state"] in ("queued", "running"):
            self.info.update(state=state, error=message)
            asyncio.get_running_loop().call_later(self.ttl_s, self._expire)

    def _expire(self) -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def cancel(self) -> dict[str, Any]:
        if self.info["state"] in ("queued", "running"):
            self.cancel_requested = True
        return self.info

    async def status(self) -> dict[str, Any]:
        return {**self.info, "cancel_requested": self.cancel_requested}

    async def result(self) -> list[dict[str, Any]] | None:
        return self.rows


class Generator:
    """A replica: the pipeline loaded once, one request (or job) generated per call."""

    def __init__(self, model: str, config: dict[str, Any]) -> None:
        from ultraflux_model.checkpoint.resolve import resolve_checkpoint
        from ultraflux_model.inference.pipeline import load_pipeline

        self.config = config
        self.root = resolve_checkpoint(model)
        self.pipe = load_pipeline(self.root, dtype=config["dtype"], accel=release_accel(config))
        self.adapters = load_served_adapters(config.get("lora", {}), self.root)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def predict(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._generate(requests, None)

    async def run_job(self, job: ray.actor.ActorHandle, requests: list[dict[str, Any]]) -> None:
        if not await job.start.remote(self.replica):
            return  # cancelled while it waited: the slot is free at once
        try:
            rows = await self._generate(requests, job)
        except asyncio.CancelledError:
            await job.end.remote("cancelled", "cancelled")
            raise
        except Cancelled as err:
            await job.end.remote("cancelled", one_line(err))
        except UltraFluxError as err:
            await job.end.remote("failed", one_line(err))
        else:
            await job.finish.remote(rows)

    async def _generate(self, requests: list[dict[str, Any]], job: ray.actor.ActorHandle | None) -> list[dict]:
        stop = threading.Event()
        reported = [0.0]  # when the job last heard from this request

        def on_step(row: int, phase: str, done: int, total: int) -> None:  # runs in the generating thread
            # Tiny steps come by the hundred per second: the job hears at most every PROGRESS_EVERY_S (and at every
            # image's last step and decode); a 4K step takes longer than that, so there it hears every step.
            now = time.monotonic()
            if job is not None and (now - reported[0] >= PROGRESS_EVERY_S or phase == "decode" or done == total):
                reported[0] = now
                if ray.get(job.progress.remote(row, phase, done, total)):
                    stop.set()
            if stop.is_set():
                raise Cancelled(f"generation cancelled at {phase} step {done} of {total} of image {row + 1}")

        loop = asyncio.get_running_loop()
        generate = functools.partial(predict_requests, self.pipe, self.root, self.config, requests, on_step,
                                     adapters=self.adapters)
        work = loop.run_in_executor(None, generate)
        try:
            frame = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The client went away or Serve cancelled the request: stop at the next step, and keep this replica's
            # slot until the device is free.
            stop.set()
            with contextlib.suppress(Exception):
                await work
            raise
        return frame.to_dict(orient="records")


api = FastAPI(title="UltraFlux", description="native-4K text-to-image generation (docs/deploy.md)")


@serve.ingress(api)
class Api:
    """The HTTP front: parses and guards requests, forwards them to the generators, holds the job routes."""

    def __init__(self, generator: DeploymentHandle, config: dict[str, Any], job_ttl_s: float, max_queued: int) -> None:
        self.generator, self.config, self.job_ttl_s, self.max_queued = generator, config, job_ttl_s, max_queued
        self.running: dict[str, DeploymentResponse] = {}  # job id -> its Serve request, while this replica follows it
        self.following: set[asyncio.Task] = set()  # the tasks that follow them (held: the loop keeps weak references)

    def _requests(self, body: bytes) -> list[dict[str, Any]]:
        """The pyfunc model's parsing and guard, from the scoring server's JSON body."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise UltraFluxError("the body must be a JSON object such as {\"dataframe_records\": [...]}")
            data.pop("params", None)
            frame = infer_and_parse_data(data, signature().inputs)
        except (ValueError, MlflowException) as err:  # JSONDecodeError is a ValueError, UltraFluxError too
            raise UltraFluxError(one_line(getattr(err, "message", err))) from None
        return parse_requests(frame, self.config)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/invocations")
    async def invocations(self, request: Request) -> JSONResponse:
        try:
            requests = self._requests(await request.body())
            rows = await self.generator.predict.remote(requests)
        except BackPressureError:
            return busy(self.max_queued)
        except Stopped as err:
            return error(503, "TEMPORARILY_UNAVAILABLE", one_line(err))
        except UltraFluxError as err:
            logger.warning("refused: %s", err)
            return error(400, "INVALID_PARAMETER_VALUE", one_line(err))
        return JSONResponse({"predictions": rows})

    @api.post("/jobs", status_code=202)
    async def submit(self, request: Request) -> JSONResponse:
        try:
            requests = self._requests(await request.body())
        except UltraFluxError as err:
            return error(400, "INVALID_PARAMETER_VALUE", one_line(err))
        job_id = uuid.uuid4().hex
        job = Job.options(name=job_id, namespace=JOB_NAMESPACE, lifetime="detached").remote(len(requests),
                                                                                            self.job_ttl_s)  # fmt: skip
        response = self.generator.run_job.remote(job, requests)
        refused: asyncio.Future[BackPressureError] = asyncio.get_running_loop().create_future()
        self.following.add(asyncio.ensure_future(self._follow(job_id, job, response, refused)))
        try:
            await asyncio.wait_for(asyncio.shield(refused), ADMISSION_WAIT_S)
        except TimeoutError:
            refused.cancel()  # accepted (queued or running); a later refusal is recorded on the job instead
        else:
            ray.kill(job, no_restart=True)
            return busy(self.max_queued)
        return JSONResponse({"job_id": job_id, "status": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result"},
                            status_code=202)  # fmt: skip

    async def _follow(self, job_id: str, job: ray.actor.ActorHandle, response: DeploymentResponse,
                      refused: asyncio.Future) -> None:  # fmt: skip
        """Wait for the job's Serve request; report a refusal by the queue to ``submit`` at once (``refused``), and
        record on the job what never reached a replica (queue full after the submission was answered, cancelled
        while queued, a replica lost)."""
        self.running[job_id] = response
        try:
            await response
        except BackPressureError as err:
            if refused.done():  # submit stopped waiting: the client holds a job id, which must say why
                await job.end.remote("rejected", one_line(err))
            else:
                refused.set_result(err)
        except (RequestCancelledError, asyncio.CancelledError):
            await job.end.remote("cancelled", "cancelled before it started")
        except Exception as err:  # noqa: BLE001 - a replica lost mid-job: the job ends failed, with the reason
            await job.end.remote("failed", one_line(err))
        finally:
            self.running.pop(job_id, None)
            self.following.discard(asyncio.current_task())

    async def _job(self, job_id: str) -> ray.actor.ActorHandle | None:
        if not JOB_ID.match(job_id):
            return None
        try:
            return ray.get_actor(job_id, namespace=JOB_NAMESPACE)
        except ValueError:
            return None

    @api.get("/jobs/{job_id}")
    async def status(self, job_id: str) -> JSONResponse:
        if (job := await self._job(job_id)) is None:
            return no_job(job_id)
        return JSONResponse({"job_id": job_id, **await job.status.remote()})

    @api.get("/jobs/{job_id}/result")
    async def result(self, job_id: str) -> JSONResponse:
        if (job := await self._job(job_id)) is None:
            return no_job(job_id)
        info = await job.status.remote()
        if info["state"] == "done":
            return JSONResponse({"predictions": await job.result.remote()})
        if info["state"] in ("queued", "running"):
            return error(409, "NOT_READY", f"job {job_id} is {info['state']} (image {info['image']} of "
                                           f"{info['images']}, step {info['step']} of {info['steps']})")
        return error(410, "JOB_" + info["state"].upper(), f"job {job_id} {info['state']}: {info['error']}")

    @api.delete("/jobs/{job_id}")
    async def cancel(self, job_id: str) -> JSONResponse:
        if (job := await self._job(job_id)) is None:
            return no_job(job_id)
        info = await job.cancel.remote()
        if info["state"] == "queued" and job_id in self.running:
            self.running[job_id].cancel()  # still in the queue: leave it now rather than when a replica frees
        return JSONResponse({"job_id": job_id, **info, "cancel_requested": True}, status_code=202)


def build_app(cfg: RayServeConfig, generate: GenerateConfig, limits: ServeConfig) -> serve.Application:
    """The application: request defaults from ``generate``, ceilings from ``limits``, scaling from ``cfg``."""
    config = serving_config(generate, limits, lora={Path(folder).name: folder for folder in cfg.lora})
    scaling: dict[str, Any] = (
        {"num_replicas": cfg.replicas} if cfg.max_replicas is None else
        {"autoscaling_config": {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                "target_ongoing_requests": cfg.max_ongoing_requests}}
    )  # fmt: skip
    generator = serve.deployment(Generator, name="UltraFluxGenerator").options(
        ray_actor_options={"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        **scaling,
    )
    # The front only waits on handles and actors: no CPU reserved, many requests at once.
    front = serve.deployment(Api, name="UltraFluxApi").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
    )
    return front.bind(generator.bind(cfg.model, config), config, cfg.job_ttl_s, cfg.max_queued_requests)


def run(cfg: RayServeConfig, generate: GenerateConfig, limits: ServeConfig,
        announce: Callable[[str], None] = print) -> None:  # fmt: skip
    """Deploy on the Ray cluster at ``cfg.address`` (or a local one), then serve until SIGINT/SIGTERM."""
    ray.init(address=cfg.address, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg, generate, limits), name=APP_NAME, route_prefix="/")
        announce(f"ultraflux serve: ready on http://{cfg.host}:{cfg.port} ({cfg.model})")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if cfg.address is None:
            serve.shutdown()
        ray.shutdown()
