"""``ultraflux serve`` on a local Ray cluster (issue 21, item 1): one server per module, started as an operator
would (the CLI against ``ray start --head``), two CPU replicas, a queue of one.

What it proves: the answer equals the library's ``generate`` byte for byte (sync and as a job); the one request
guard refuses before anything is queued; two replicas generate at the same moment; a full queue answers 429 with
one line; a cancelled job and a disconnected client each free their replica at the next step."""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import time
from typing import Any

import pytest

from tests.servers import REPO, REPO_PATH, ServerProcess, free_port

MAX_STEPS = 100_000  # the server's ceiling: a request this long (32x32) runs for many minutes on a CPU, until stopped
MAX_PIXELS = 64 * 64
SMALL = {"prompt": "a red fox in fresh snow", "width": 32, "height": 32, "steps": 2}
LONG = {**SMALL, "steps": MAX_STEPS}
WAIT_S = 180.0  # bound of every wait on the server (2 shared cores)


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: object = None, timeout: float = 120) -> tuple[int, dict, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            return response.status, (json.loads(text) if text else {}), response.headers  # case-insensitive
        finally:
            conn.close()

    def submit(self, *rows: dict) -> str:
        status, body, _ = self.call("POST", "/jobs", {"dataframe_records": list(rows)})
        assert status == 202, body
        return body["job_id"]

    def cancel(self, *job_ids: str) -> None:
        """Cancel and wait until each job has ended (a test never leaves a long job holding a replica)."""
        for job_id in job_ids:
            self.call("DELETE", f"/jobs/{job_id}")
        for job_id in job_ids:
            self.wait_job(job_id, lambda i: i["state"] not in ("queued", "running"), "ended")

    def job(self, job_id: str) -> dict:
        status, body, _ = self.call("GET", f"/jobs/{job_id}")
        assert status == 200, body
        return body

    def wait_job(self, job_id: str, ok, what: str) -> dict:  # noqa: ANN001 - predicate on the status
        deadline = time.monotonic() + WAIT_S
        while True:
            info = self.job(job_id)
            if ok(info):
                return info
            assert time.monotonic() < deadline, f"job {job_id} never {what}: {info}"
            time.sleep(0.2)


def _running(info: dict) -> bool:
    return info["state"] == "running" and info["step"] >= 1


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoint, tmp_path_factory) -> Server:
    port = free_port()
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": REPO_PATH, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_cluster.token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-c", "from ultraflux.cli import main; main()", "serve", "-c", str(REPO / "params.yaml"),
           "-c", str(REPO / "configs" / "tiny.yaml"), "--model", str(tiny_checkpoint),
           "--address", ray_cluster.address, "--port", str(port), "--replicas", "2", "--num-cpus", "1",
           "--max-queued-requests", "1", "--set", f"serve.max_steps={MAX_STEPS}",
           "--set", f"serve.max_pixels={MAX_PIXELS}"]
    with ServerProcess("ultraflux serve", cmd, f"tcp://127.0.0.1:{port}", log, env=env, cwd=REPO,
                       timeout_s=WAIT_S) as proc:  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while "ultraflux serve: ready" not in log.read_text(errors="replace"):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ultraflux serve did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield Server(port)


def test_answers_equal_the_library_generate_byte_for_byte(server, tiny_checkpoint, tmp_path):
    from ultraflux.config import load_config
    from ultraflux_model.inference.pipeline import generate

    gen = load_config(REPO / "params.yaml", REPO / "configs" / "tiny.yaml").generate
    # no seed or guidance column: the release's defaults, row k seeded seed + k (as ultraflux generate numbers them)
    rows = [SMALL, {"prompt": "a lighthouse at dusk", "width": 64, "height": 32, "steps": 3}]
    split = {"columns": list(SMALL), "data": [list(row.values()) for row in rows]}
    status, body, _ = server.call("POST", "/invocations", {"dataframe_split": split})
    assert status == 200, body
    answers = body["predictions"]
    expected = [
        generate(tiny_checkpoint, [row["prompt"]], [(row["width"], row["height"])], steps=row["steps"],
                 seed=gen.seed + k, guidance=gen.guidance, shift=gen.shift, dtype=gen.dtype, vae_decode=gen.vae_decode,
                 out_dir=tmp_path / str(k), progress=False, max_sequence_length=gen.max_sequence_length)[0]
        for k, row in enumerate(rows)
    ]
    for answer, image in zip(answers, expected, strict=True):
        assert base64.b64decode(answer["image"]) == image.path.read_bytes()
        sidecar = json.loads(answer["metadata"])
        for key in ("prompt", "seed", "width", "height", "steps", "guidance", "shift", "dtype", "model_hash"):
            assert sidecar[key] == image.sidecar[key], key
    # the same request as an asynchronous job: the same bytes
    job_id = server.submit(*rows)  # records: every cell present
    info = server.wait_job(job_id, lambda i: i["state"] == "done", "finished")
    assert (info["images"], info["image"], info["step"], info["steps"]) == (2, 2, 1, 1)  # last progress: the decode
    status, body, _ = server.call("GET", f"/jobs/{job_id}/result")
    assert status == 200 and [a["image"] for a in body["predictions"]] == [a["image"] for a in answers]


@pytest.mark.parametrize("path", ["/invocations", "/jobs"])
def test_the_request_guard_refuses_before_anything_is_queued(server, path):
    over = {**SMALL, "width": 128, "height": 64}  # 8192 px > serve.max_pixels
    status, body, _ = server.call("POST", path, {"dataframe_records": [over]})
    assert status == 400, body
    assert body == {"error_code": "INVALID_PARAMETER_VALUE",
                    "message": "row 0: 128x64 is 0.0 MP, over the limit of 0.0 MP per image (serve.max_pixels); "
                               "choose a smaller size, e.g. 64x32 at the same aspect ratio"}  # fmt: skip
    status, body, _ = server.call("POST", path, {"dataframe_records": [{**SMALL, "steps": MAX_STEPS + 1}]})
    assert status == 400 and "serve.max_steps" in body["message"]
    status, body, _ = server.call("POST", path, b"{not json")
    assert status == 400 and "\n" not in body["message"]


def test_two_replicas_run_at_once_a_full_queue_answers_429_and_cancel_frees_a_replica(server):
    first, second = server.submit(LONG), server.submit(LONG)
    try:
        a = server.wait_job(first, _running, "ran")
        b = server.wait_job(second, _running, "ran")
        assert a["replica"] != b["replica"]
        assert _running(server.job(first))  # both generate at this moment, each on its own replica

        queued = server.submit({**SMALL, "seed": 3})  # the queue's one place
        assert server.job(queued)["state"] == "queued"
        for path in ("/invocations", "/jobs"):
            status, body, headers = server.call("POST", path, {"dataframe_records": [SMALL]})
            assert status == 429, (path, body)
            assert body["error_code"] == "RESOURCE_EXHAUSTED" and "ray_serve.max_queued_requests" in body["message"]
            assert headers.get("Retry-After") == "5"

        status, body, _ = server.call("DELETE", f"/jobs/{first}")
        assert status == 202 and body["cancel_requested"]
        stopped = server.wait_job(first, lambda i: i["state"] == "cancelled", "cancelled")
        assert stopped["step"] < MAX_STEPS and "cancelled" in stopped["error"]
        done = server.wait_job(queued, lambda i: i["state"] == "done", "ran on the freed replica")
        assert done["replica"] == a["replica"]  # the cancelled job's replica took it; the other one is still busy
        assert _running(server.job(second))
        status, body, _ = server.call("GET", f"/jobs/{second}/result")
        assert status == 409 and body["error_code"] == "NOT_READY"

        server.call("DELETE", f"/jobs/{second}")
        server.wait_job(second, lambda i: i["state"] == "cancelled", "cancelled")
        status, body, _ = server.call("GET", f"/jobs/{second}/result")
        assert status == 410 and body["error_code"] == "JOB_CANCELLED"
        assert server.call("GET", "/jobs/" + "0" * 32)[0] == 404
    finally:
        server.cancel(first, second)


def test_a_disconnected_client_frees_its_replica(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.request("POST", "/invocations", body=json.dumps({"dataframe_records": [LONG]}),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    other = server.submit(LONG)
    try:
        server.wait_job(other, _running, "ran")
        waiting = server.submit({**SMALL, "seed": 4})
        time.sleep(1.0)  # not a speed claim: gives a wrongly free replica the chance to take the job
        assert server.job(waiting)["state"] == "queued"  # both replicas busy: the long sync request holds one
        conn.close()  # the client goes away
        server.wait_job(waiting, lambda i: i["state"] == "done", "ran on the freed replica")
    finally:
        conn.close()
        server.cancel(other)


def test_replica_bounds_are_validated_with_one_line_per_field():
    from ultraflux.config import load_config
    from ultraflux_core.errors import UltraFluxError

    cfg = load_config(REPO / "params.yaml", overrides=["ray_serve.replicas=2", "ray_serve.max_replicas=4"])
    assert (cfg.ray_serve.replicas, cfg.ray_serve.max_replicas) == (2, 4)
    with pytest.raises(UltraFluxError, match=r"max_replicas \(1\) must be at least replicas \(2\)"):
        load_config(REPO / "params.yaml", overrides=["ray_serve.replicas=2", "ray_serve.max_replicas=1"])
    with pytest.raises(UltraFluxError, match="ray_serve.max_queued_requests"):
        load_config(REPO / "params.yaml", overrides=["ray_serve.max_queued_requests=0"])
