"""The registry against real services: ``mlflow server`` (SQLite backend, artifacts proxied to moto's S3 server),
both started on 127.0.0.1 by the fixtures of tests/servers.py.

One test walks the user's path, phase by phase (servers cost tens of seconds to start on a busy machine):
release flow → champion in the registry, weights in S3 → ``ultraflux generate --model models:/ultraflux@champion``
from another directory (no S3 credentials: the server proxies) → ``mlflow models serve`` answers
``POST /invocations`` with a PNG → with the blobs gone from S3 the cached champion still resolves → concurrent
promoters through the server-side mutex leave the best version as champion.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.servers import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]

RELEASE_DRIVER = """
import json, sys
from flows.release_flow import release_flow
args = json.loads(sys.argv[1])
json.dump(release_flow(overrides=args["overrides"], out=args["out"]), open(args["result"], "w"), default=str)
"""


def _client_env(tmp_path: Path, uri: str, cache: str) -> dict[str, str]:
    """A user's shell: tracking URI and model cache, and no S3 credentials or endpoint of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    env.update(MLFLOW_TRACKING_URI=uri, ULTRAFLUX_MODEL_CACHE=str(tmp_path / cache),
               PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=os.pathsep.join(
                   p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])}...:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _generate_champion(tmp_path: Path, uri: str, cwd: Path, cache: str) -> Image.Image:
    env = _client_env(tmp_path, uri, cache)
    out = cwd / f"generated-{cache}"
    _run([sys.executable, "-c", "from ultraflux.cli import main; main()", "generate", "--model", "models:/ultraflux@champion",
          "--prompt", "a red fox in snow", "--width", "96", "--height", "64", "--steps", "2", "--dtype", "fp32",
          "--out", str(out)], cwd, env)
    (png,) = out.rglob("*.png")  # each run writes into a new folder under --out
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["model"] == "models:/ultraflux@champion"
    return Image.open(png)


def _blob_keys(moto_s3) -> list[str]:
    pages = moto_s3.client().get_paginator("list_objects_v2").paginate(Bucket=moto_s3.bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if "/blobs/" in o["Key"]]


@pytest.mark.slow
def test_release_fetch_generate_serve_and_promote_through_the_server(tmp_path, tiny_checkpoint, mlflow_server,
                                                                      moto_s3, monkeypatch):
    from mlflow.entities import LoggedModelStatus
    from ultraflux_core.errors import UltraFluxError
    from ultraflux_core.tracking.uri import client_for, registered_version
    from ultraflux_model.checkpoint.layout import fingerprint
    from ultraflux_model.checkpoint.resolve import resolve_checkpoint
    from ultraflux_model.release.fetch import release_manifest

    uri = mlflow_server.uri
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()

    # 1. the release flow (assemble → evaluate → log the pyfunc release → register → promote) against the server
    args = {"out": str(work / "release"), "result": str(tmp_path / "release.json"), "overrides": [
        f"train.model={tiny_checkpoint}", "eval.benchmark.prompts=[a red fox in snow]",
        "eval.benchmark.metrics=[glcm,compression_ratio,clip_score]", "generate.steps=2", "generate.dtype=fp32",
        "generate.sizes=[[64, 64]]"]}
    _run([sys.executable, "-c", RELEASE_DRIVER, json.dumps(args)], work, {**_client_env(tmp_path, uri, "cache-flow"),
                                                                         **moto_s3.env})
    release = json.loads((tmp_path / "release.json").read_text())
    assert release["registry"]["promoted"] and release["registry"]["version"] == "1"
    client = client_for(uri)
    champion = client.get_model_version_by_alias("ultraflux", "champion")
    (output,) = client.get_run(release["run_id"]).outputs.model_outputs  # the release, logged by the eval run
    logged = client.get_logged_model(output.model_id)
    assert champion.source == logged.artifact_location and champion.run_id == release["run_id"]
    assert logged.source_run_id == release["run_id"] and logged.status == LoggedModelStatus.READY
    manifest = release_manifest("models:/ultraflux@champion", uri)
    assert manifest.blob_root.startswith("mlflow-artifacts:/")  # proxied: clients never see the bucket
    distinct = {sha for sha, _ in manifest.files.values()}
    keys = _blob_keys(moto_s3)
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(distinct)  # each file once, in S3
    assert not [k for k in keys if "/models/" in k]  # no weights copied into the logged model

    # 2. the champion from another directory, as a user would fetch it (downloads into cache-a)
    first = _generate_champion(tmp_path, uri, elsewhere, "cache-a")
    assert first.size == (96, 64)
    cached = tmp_path / "cache-a" / manifest.content_hash
    assert fingerprint(cached) == fingerprint(work / release["checkpoint"])  # the released bytes, exactly

    # 3. `mlflow models serve` of the alias (its own cache: it downloads too) answers with an image
    port = free_port()
    serve_env = _client_env(tmp_path, uri, "cache-serve")
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv
    serve_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), serve_env.get("PATH", "")])
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/ultraflux@champion", "--env-manager",
           "local", "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess("mlflow models serve", cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "logs" / "serve.log",
                       env=serve_env, cwd=elsewhere):
        body = {"dataframe_split": {"columns": ["prompt", "width", "steps"],
                                    "data": [["a lighthouse", 96, 2], ["a bowl of ramen", 64, 2]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - loopback
            predictions = json.loads(response.read())["predictions"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(p["image"]))).size for p in predictions]
    assert sizes == [(96, 64), (64, 64)]  # height from the release's generate.sizes default
    assert [json.loads(p["metadata"])["seed"] for p in predictions] == [0, 1]  # seed + row, as generate
    assert (tmp_path / "cache-serve" / manifest.content_hash).is_dir()

    # 4. the second fetch is a cache hit: with every blob deleted from S3, cache-a still resolves the champion,
    #    while an empty cache now fails to download
    s3 = moto_s3.client()
    for key in keys:
        s3.delete_object(Bucket=moto_s3.bucket, Key=key)
    assert _blob_keys(moto_s3) == []
    monkeypatch.setenv("ULTRAFLUX_MODEL_CACHE", str(tmp_path / "cache-a"))
    assert resolve_checkpoint("models:/ultraflux@champion", uri) == cached
    monkeypatch.setenv("ULTRAFLUX_MODEL_CACHE", str(tmp_path / "cache-empty"))
    with pytest.raises(UltraFluxError, match="cannot download blob"):
        resolve_checkpoint("models:/ultraflux@champion", uri)
    assert registered_version(uri, "models:/ultraflux@champion") == ("ultraflux", "1")

    # 5. promotion is serialised by the server: concurrent promoters, the best one ends as champion
    _concurrent_promotions_leave_the_best_champion(uri, f"models:/{output.model_id}")
    _server_lock_is_exclusive_and_breaks_a_dead_lock_once(uri)


def _concurrent_promotions_leave_the_best_champion(uri: str, source: str) -> None:
    from ultraflux_core.tracking.config import PromotionConfig
    from ultraflux_core.tracking.registry import promote_if_better, register_checkpoint
    from ultraflux_core.tracking.uri import client_for

    client = client_for(uri)
    experiment = client.create_experiment("promotion-race")
    rule = PromotionConfig(model_name="race", metric="score")
    scores = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8]
    versions = {}
    for score in scores:
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "score", score)
        tags = {"git_sha": "x", "dvc_data_hash": "none", "config_hash": "0", "eval_run_id": run}
        versions[register_checkpoint(uri, "race", source, tags)] = score
    start = threading.Barrier(len(versions))
    decisions, errors = {}, []

    def promote(version: str) -> None:
        start.wait()
        try:
            decisions[version] = promote_if_better(uri, version, rule)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    best = max(versions, key=versions.get)
    assert str(client.get_model_version_by_alias("race", "champion").version) == best
    assert decisions[best].promoted
    # every promoter saw a consistent holder: nobody was told it won over a better model
    for version, decision in decisions.items():
        if decision.promoted and decision.champion_value is not None:
            assert versions[version] > decision.champion_value
    assert "race.promotion-lock" not in {m.name for m in client.search_registered_models()}  # released


def _server_lock_is_exclusive_and_breaks_a_dead_lock_once(uri: str) -> None:
    """The registry lock through the REST API: exclusive while held and renewed; a dead holder's expired lock
    broken by exactly one of several concurrent breakers (the server's rename is the atomic step); a breaker with
    a stale view gives a live lock back."""
    import time

    from ultraflux_core.tracking.lock import LOCK_SUFFIX, RegistryLock
    from ultraflux_core.tracking.uri import client_for

    client = client_for(uri)

    def lock() -> RegistryLock:
        return RegistryLock(client, "locktest", ttl_s=60.0, renewing=False)

    holder, waiter = lock(), lock()
    assert holder.try_acquire() and not waiter.try_acquire() and waiter.expired_holder() is None
    assert holder.renew() and holder.held()
    holder.release()
    assert waiter.try_acquire()
    waiter.release()
    for round_ in range(3):  # the "both held it in 3 of 3 rounds"
        dead = f"dead-host:{round_}:x"
        expired = {"token": dead, "expires": f"{time.time() - 1:.3f}"}
        client.create_registered_model(f"locktest{LOCK_SUFFIX}", tags=expired)
        breakers = [lock() for _ in range(4)]
        assert {b.expired_holder() for b in breakers} == {dead}
        won = _break_together(breakers, dead)
        assert len(won) == 1, f"round {round_}: {len(won)} breakers hold the lock"
        stale = lock()  # saw the dead lock expired too, acts only now: must not keep the winner's lock
        assert not stale.break_expired(dead) and won[0].held()
        won[0].release()


def _break_together(breakers: list, token: str) -> list:
    """Every breaker breaks ``token``'s lock and takes it at the same moment (threads); returns who holds it."""
    start, won = threading.Barrier(len(breakers)), []

    def attempt(breaker) -> None:  # noqa: ANN001 - a RegistryLock
        start.wait()
        if breaker.break_expired(token) and breaker.try_acquire():
            won.append(breaker)

    threads = [threading.Thread(target=attempt, args=(b,)) for b in breakers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return won
