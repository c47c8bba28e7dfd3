"""Real services for tests, started as a user would (CLI processes on 127.0.0.1, free ports) and always stopped.

Each server is a child process in its own session, polled on a health URL with a bounded wait, and killed by PID
(with its whole process group) on exit, also when the test fails. Logs go to a file under the test's tmp path and
are quoted in the failure message when a server does not come up.

Fixtures (registered for every test by tests/conftest.py; import helpers with ``from tests.servers import free_port``):
- ``moto_s3``: moto's standalone S3 server; yields an :class:`S3Endpoint` with a fresh bucket and sets the AWS
  environment (dummy credentials, endpoint URL) for the test.
- ``mlflow_server``: ``mlflow server`` with a SQLite backend and artifacts proxied to the moto bucket.
- ``prefect_server``: ``prefect server start`` with a per-test ``PREFECT_HOME``; yields the client environment.
- ``ray_cluster``: ``ray start --head --block`` with token auth on loopback; yields its GCS address and token.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What child processes (flows, workers, servers) import: this checkout's packages, also when the venv's editable
# install points elsewhere (a worktree, or the mutation guard's patched copy).
PACKAGE_SRC = tuple(sorted(REPO.glob("packages/*/src")))
REPO_PATH = os.pathsep.join(str(p) for p in (*PACKAGE_SRC, REPO))
START_TIMEOUT_S = 180.0  # generous: 2 shared cores, cold imports of mlflow/prefect take tens of seconds


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    if url.startswith("tcp://"):  # a service without HTTP: the port accepts connections
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback health URL
            return 200 <= response.status < 500
    except OSError:
        return False


class ServerProcess:
    """A service started from its command line, waited for on ``health_url`` and stopped by PID.

    Use as a context manager; ``__exit__`` terminates the whole process group (servers such as ``mlflow server``
    fork workers), waits, and kills what is left.
    """

    def __init__(self, name: str, cmd: Sequence[str], health_url: str, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 timeout_s: float = START_TIMEOUT_S) -> None:
        self.name, self.cmd, self.health_url = name, list(cmd), health_url
        self.log_path, self.env, self.cwd, self.timeout_s = log_path, dict(env or os.environ), cwd, timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while not _healthy(self.health_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                self.__exit__(None, None, None)
                tail = self.log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"{self.name} did not become healthy at {self.health_url} ({state}):\n{tail}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            # the group leader may be gone while forked workers linger: sweep the group once more
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


@dataclass(frozen=True)
class S3Endpoint:
    """A moto S3 server and one fresh bucket in it."""

    url: str
    bucket: str
    env: dict[str, str]

    def client(self):  # noqa: ANN201 - boto3 client type is dynamic
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture()
def moto_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with ServerProcess("moto S3", cmd, f"{url}/moto-api/", tmp_path / "logs" / "moto.log"):
        env = {**S3_ENV, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        endpoint = S3Endpoint(url=url, bucket="ultraflux-test", env=env)
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    artifacts: str


@pytest.fixture()
def mlflow_server(tmp_path: Path, moto_s3: S3Endpoint) -> Iterator[MlflowServer]:
    """``mlflow server``: SQLite backend, artifacts proxied (``mlflow-artifacts:``) to the moto bucket."""
    port = free_port()
    artifacts = f"s3://{moto_s3.bucket}/mlflow"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
           "--artifacts-destination", artifacts, "--serve-artifacts", "--workers", "1"]
    env = {**os.environ, **moto_s3.env}
    with ServerProcess("mlflow server", cmd, f"http://127.0.0.1:{port}/health", tmp_path / "logs" / "mlflow.log",
                       env=env, cwd=tmp_path):
        yield MlflowServer(uri=f"http://127.0.0.1:{port}", artifacts=artifacts)


@pytest.fixture()
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free port; yields the environment that points Prefect clients at it."""
    port = free_port()
    base = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": REPO_PATH}
    base.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with ServerProcess("prefect server", cmd, f"http://127.0.0.1:{port}/api/health",
                       tmp_path / "logs" / "prefect-server.log", env=base):
        yield {**base, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS, host:port (what compute.address takes)
    token: str


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A one-node Ray cluster as an operator starts it (``ray start --head``, token auth, 2 CPUs, no dashboard).

    One per test module (start-up and shutdown take tens of seconds on 2 cores), in its own session and a short temp
    dir (Ray's socket paths must stay under ~107 characters), stopped by its process group — never a machine-wide
    ``ray stop``. Its workers import this checkout (PYTHONPATH), like the driver."""
    import secrets
    import tempfile

    port = free_port()
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": REPO_PATH, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        log = tmp_path_factory.mktemp("ray-head") / "ray-head.log"
        with ServerProcess("ray head", cmd, f"tcp://127.0.0.1:{port}", log, env=env, cwd=REPO):
            yield RayCluster(address=f"127.0.0.1:{port}", token=token)
    finally:
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
