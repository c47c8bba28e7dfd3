"""The web app as users start it: `ultraflux ui` in a subprocess on a free loopback port, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

QUEUE_SIZE = 2  # jobs waiting (besides the running one) before the app refuses more
SESSION_JOBS = 2  # jobs one client may have queued or running
STARTUP_TIMEOUT_S = 180  # cold imports of torch + diffusers + gradio on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class App:
    url: str
    out: Path
    model: Path
    compare: Path
    pid: int
    queue_size: int = QUEUE_SIZE
    session_jobs: int = SESSION_JOBS


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ultraflux ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"`ultraflux ui` did not answer within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def second_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny checkpoint (other seed: other weights, other hash)."""
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny-ultraflux-b", seed=1)


@pytest.fixture(scope="session")
def studio_app(tiny_checkpoint: Path, second_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """`ultraflux ui --model A --compare B` via the installed console script; always stopped by its PID."""
    root = tmp_path_factory.mktemp("studio")
    out, log = root / "out", root / "server.log"
    port = free_port()
    exe = Path(sys.executable).with_name("ultraflux")
    cmd = [str(exe), "ui", "--model", str(tiny_checkpoint), "--compare", str(second_checkpoint),
           "--port", str(port), "--out", str(out), "--steps", "2",
           "--queue-size", str(QUEUE_SIZE), "--session-jobs", str(SESSION_JOBS)]  # fmt: skip
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(proc, url, log)
        yield App(url=url, out=out, model=tiny_checkpoint, compare=second_checkpoint, pid=proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and anything it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
