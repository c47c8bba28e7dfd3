"""The served model under attack (issue: serving hardening): the request guard through ``mlflow.pyfunc.load_model``
and through one real ``mlflow models serve`` (HTTP 400 ``INVALID_PARAMETER_VALUE`` with the one-line message, no
stack trace), every request column reaching the image, and SIGTERM ending a long request at its next step."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image
from ultraflux_model.config import GenerateConfig, ServeConfig
from ultraflux_model.release.fetch import CACHE_ENV
from ultraflux_model.serving.publish import log_release
from ultraflux_model.serving.pyfunc import serving_config

from tests.servers import ServerProcess, free_port

MAX_STEPS = 100_000  # this release's ceiling: high enough that an allowed request runs until it is stopped
LONG = MAX_STEPS  # the request SIGTERM interrupts (32x32: many minutes on a CPU, so it is still running)
# (column, value, message): the attacks, each refused with a message naming the parameter and range.
ATTACKS = [
    ("steps", 10**9, f"row 0: steps must be between 1 and {MAX_STEPS} (serve.max_steps), got 1000000000"),
    ("guidance", float("inf"), "row 0: guidance must be a finite number, got inf"),
    ("seed", -1, "row 0: seed must lie between 0 and 2**63-1"),
    ("width", 4096, "row 0: 4096x32 is 0.1 MP, over the limit of 0.0 MP per image (serve.max_pixels)"),
    # 2**63 does not fit the signature's int64 column: in-process, MLflow's schema check refuses it before the model
    # runs; over HTTP, MLflow's JSON parsing wraps it to -2**63 (how it once went through): the guard refuses that.
    ("seed", 2**63, "Incompatible input types for column seed"),
]
OVER_HTTP = {"Incompatible input types for column seed": "row 0: seed must lie between 0 and 2**63-1"}


@pytest.fixture(scope="module")
def release(tiny_checkpoint, tmp_path_factory):
    """A release of the tiny checkpoint in a SQLite tracking store: ``(model_uri, environment for clients)``."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, CACHE_ENV: str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        gen = GenerateConfig(sizes=((32, 32),), steps=2, dtype="fp32")
        limits = ServeConfig(max_pixels=64 * 32, max_images=5, max_steps=MAX_STEPS)
        logged = log_release(tiny_checkpoint, uri, client.create_run(experiment).info.run_id,
                             serving_config(gen, limits))  # fmt: skip
        yield logged.model_uri, env, root


@pytest.fixture(scope="module")
def model(release):
    import mlflow.pyfunc

    uri, env, _ = release
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield mlflow.pyfunc.load_model(uri)


def _images(frame: pd.DataFrame) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) for b64 in frame["image"]]


@pytest.mark.parametrize("column,value,message", ATTACKS, ids=[f"{a[0]}={a[1]}" for a in ATTACKS])
def test_load_model_predict_refuses_the_attacks(model, column, value, message):
    from mlflow.exceptions import MlflowException

    row = {"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "guidance": 4.0, "seed": 0, column: value}
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame([row]))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    if message.startswith("row 0"):  # ours: exactly the guard's one line
        assert err.value.message.startswith(message) and "\n" not in err.value.message
    else:
        assert message in err.value.message


def test_every_request_column_reaches_the_image(model):
    base = {"prompt": "a red fox", "width": 32, "height": 32, "steps": 2, "guidance": 4.0, "seed": 7}
    changed = {"steps": 3, "guidance": 1.0, "seed": 8, "width": 64}
    out = model.predict(pd.DataFrame([base] + [{**base, name: value} for name, value in changed.items()]))
    first, *others = _images(out)
    for name, image in zip(changed, others, strict=True):
        assert image.shape != first.shape or not np.array_equal(image, first), name
    assert [json.loads(m)["steps"] for m in out["metadata"]] == [2, 3, 2, 2, 2]
    assert [json.loads(m)["guidance"] for m in out["metadata"]] == [4.0, 4.0, 1.0, 4.0, 4.0]


def _post(port: int, rows: list[dict], timeout: float = 300) -> tuple[int, str]:
    body = {"dataframe_split": {"columns": list(rows[0]), "data": [list(r.values()) for r in rows]}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_for(predicate, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_served_model_answers_400_with_one_line_and_stops_on_sigterm(release):
    """One `mlflow models serve`: every attack is a 400 with the one line; then SIGTERM during an allowed but long
    request ends it at its next step (503 naming the step) and the server process exits."""
    uri, env, root = release
    port = free_port()
    serve_env = {**os.environ, **env, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "3600"}
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv
    serve_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), serve_env.get("PATH", "")])
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host",
           "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = root / "serve.log"
    with ServerProcess("mlflow models serve", cmd, f"http://127.0.0.1:{port}/ping", log, env=serve_env,
                       cwd=root) as served:  # fmt: skip
        for column, value, in_process in ATTACKS:
            message = OVER_HTTP.get(in_process, in_process)
            row = {"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "guidance": 4.0, "seed": 0, column: value}
            status, body = _post(port, [row])
            assert status == 400, (column, body)
            error = json.loads(body)
            assert error["error_code"] == "INVALID_PARAMETER_VALUE", body
            # exactly the guard's one line, not MLflow's "Failed to predict data '<the whole table>'"
            assert error["message"].startswith(message) and "\n" not in error["message"], body
            assert "Traceback" not in body and "stack_trace" not in error

        # the scoring server: `mlflow models serve` runs it as a child process (bash -c "exec uvicorn ...")
        (server,) = [p for p in psutil.Process(served.proc.pid).children(recursive=True) if _is_uvicorn(p)]
        answer: dict[str, object] = {}
        long_request = [{"prompt": "a long request", "width": 32, "height": 32, "steps": LONG}]
        worker = threading.Thread(
            target=lambda: answer.update(zip(("status", "body"), _post(port, long_request, timeout=600), strict=True))
        )
        worker.start()
        _wait_for(lambda: f"row 1 of 1: 32x32, {LONG} steps" in log.read_text(errors="replace"), "the long request")
        server.send_signal(signal.SIGTERM)
        worker.join(timeout=600)
        assert answer.get("status") == 503, answer
        error = json.loads(str(answer["body"]))
        assert error["error_code"] == "TEMPORARILY_UNAVAILABLE", error
        done = int(error["message"].split("stopped after step ")[1].split(" of ")[0])
        assert 1 <= done < LONG and f"of {LONG}: the server is shutting down" in error["message"]
        server.wait(timeout=120)  # the worker exits (raises psutil.TimeoutExpired if it hangs)
        assert not server.is_running()


def _is_uvicorn(process: psutil.Process) -> bool:
    try:
        return any("uvicorn" in part for part in process.cmdline())
    except psutil.NoSuchProcess:
        return False
