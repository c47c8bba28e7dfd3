"""A client needs only the tracking URI: releases resolve through the server's artifact proxy when the client
cannot reach S3; a failing or absent server gives a clear message after the configured (bounded) retries; a
release already cached resolves from the last known mapping when the server is down; and the readiness check
proves the artifact store is writable, which ``/health`` does not.
"""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.client import HttpClientConfig
from ultraflux_core.tracking.uri import TrackingUnavailable

from tests.servers import ServerProcess, free_port

MODEL = "models:/ultraflux@champion"
MLFLOW_KEYS = tuple(HttpClientConfig().environment())


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MLflow client variable starts unset and is restored afterwards (the code under test sets them)."""
    for key in MLFLOW_KEYS:
        monkeypatch.delenv(key, raising=False)
    from ultraflux_core.tracking import client

    monkeypatch.setattr(client, "_APPLIED", {})


class _Failing(http.server.BaseHTTPRequestHandler):
    """A tracking server that is down behind its proxy: every request gets 503 (and is counted)."""

    hits = 0

    def _fail(self) -> None:
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _fail

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def failing_server() -> Iterator[str]:
    _Failing.hits = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_failing_server_is_reported_after_the_configured_retries(failing_server, tmp_path, monkeypatch) -> None:
    from ultraflux_model.release.fetch import fetch_release

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the user's own setting: kept
    with pytest.raises(TrackingUnavailable, match=r"did not answer after 3 tries \(MLFLOW_HTTP_REQUEST_MAX_RETRIES=2"):
        fetch_release(MODEL, tmp_path / "cache", failing_server)
    assert _Failing.hits == HttpClientConfig().max_retries + 1  # bounded by our default, not MLflow's 7
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"

    _Failing.hits = 0
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # exported by the user: wins over our default
    with pytest.raises(TrackingUnavailable, match="after 1 tries"):
        fetch_release(MODEL, tmp_path / "cache", failing_server)
    assert _Failing.hits == 1


def test_a_cached_release_resolves_from_the_last_known_mapping_when_the_server_is_down(
        failing_server, tmp_path, monkeypatch) -> None:
    from ultraflux_core.files import file_sha256
    from ultraflux_model.release.aliases import remember
    from ultraflux_model.release.fetch import VERIFIED_SUFFIX, fetch_release
    from ultraflux_model.release.manifest import Manifest

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"release bytes")
    manifest = Manifest({"transformer/weights.bin": (file_sha256(weights), weights.stat().st_size)}, "unused://")
    remember(cache, failing_server, MODEL, "3", manifest)
    with pytest.raises(TrackingUnavailable):  # the mapping is known but its release is not in the cache
        fetch_release(MODEL, cache, failing_server)
    folder = cache / manifest.content_hash
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "weights.bin").write_bytes(b"planted bytes")  # a folder that merely exists
    with pytest.raises(TrackingUnavailable):  # no verified marker: never served
        fetch_release(MODEL, cache, failing_server)
    (folder / "transformer" / "weights.bin").write_bytes(b"release bytes")  # what materialize writes, then
    folder.with_name(folder.name + VERIFIED_SUFFIX).write_text(manifest.content_hash)  # its marker
    with pytest.warns(UserWarning, match=r"cached release [0-9a-f]+ that models:/ultraflux@champion named .*version 3"):
        assert fetch_release(MODEL, cache, failing_server) == folder
    with pytest.raises(TrackingUnavailable):  # another alias was never resolved here
        fetch_release("models:/ultraflux@staging", cache, failing_server)


def test_a_server_that_is_not_listening_is_reported_with_the_retry_settings(tmp_path, monkeypatch) -> None:
    from ultraflux_model.release.fetch import fetch_release

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(TrackingUnavailable, match=r"MLflow tracking server http://127.0.0.1:\d+ did not answer"):
        fetch_release(MODEL, tmp_path / "cache", f"http://127.0.0.1:{free_port()}")


def _block_port(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """This process cannot reach ``port`` on loopback (the S3 endpoint behind a firewall, as seen by a client)."""
    connect = socket.socket.connect

    def guarded(self: socket.socket, address, *args, **kwargs):  # noqa: ANN001, ANN202
        if isinstance(address, tuple) and address[1] == port:
            raise ConnectionRefusedError(f"S3 endpoint port {port} is unreachable from this client")
        return connect(self, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.mark.slow
def test_models_uri_resolves_through_the_server_when_s3_is_unreachable(tmp_path, tiny_checkpoint, mlflow_server,
                                                                         moto_s3, monkeypatch) -> None:
    from ultraflux_core.tracking.readiness import check_artifact_store
    from ultraflux_core.tracking.registry import register_checkpoint
    from ultraflux_core.tracking.uri import client_for, experiment_id
    from ultraflux_model.checkpoint.layout import fingerprint
    from ultraflux_model.release.fetch import fetch_release
    from ultraflux_model.serving.publish import log_release

    uri = mlflow_server.uri
    assert check_artifact_store(uri).endswith("/readiness")  # readiness: a probe written, read back, deleted

    client = client_for(uri)
    run_id = client.create_run(experiment_id(client, "ultraflux-eval", uri)).info.run_id
    logged = log_release(tiny_checkpoint, uri, run_id)
    tags = {"git_sha": "test", "dvc_data_hash": "test", "config_hash": "test", "eval_run_id": run_id}
    version = register_checkpoint(uri, "ultraflux", logged.model_uri, tags)
    client.set_registered_model_alias("ultraflux", "champion", version)

    # The client: only the tracking URI. Its S3 endpoint is a closed port, no credentials, and the server's own S3
    # endpoint (the moto port, which presigned URLs would name) is unreachable from it.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", closed)
    monkeypatch.setenv("MLFLOW_MULTIPART_DOWNLOAD_MINIMUM_FILE_SIZE", "1")  # every blob would go multipart
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    _block_port(monkeypatch, urlparse(moto_s3.url).port)

    # The server advertises multipart downloads (an S3 store); without our proxied default MLflow would fetch
    # presigned URLs naming the moto port and fail here (slowly: MLflow retries each chunk).
    fetched = fetch_release(MODEL, tmp_path / "cache", uri)
    assert fingerprint(fetched) == fingerprint(tiny_checkpoint)  # every byte came through the server
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"


@pytest.mark.slow
def test_readiness_fails_clearly_when_the_artifact_store_is_not_writable(tmp_path, moto_s3, monkeypatch) -> None:
    """A server whose S3 side is wrong still answers /health; the readiness check names the failing step."""
    from ultraflux_core.tracking.readiness import check_artifact_store

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'bad.db'}", "--serve-artifacts", "--workers", "1",
           "--artifacts-destination", "s3://no-such-bucket/mlflow"]
    # moto accepts any key pair, so the S3 side the server cannot use is a bucket its keys do not reach
    env = {**os.environ, **moto_s3.env, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
    uri = f"http://127.0.0.1:{port}"
    with ServerProcess("mlflow server (broken S3)", cmd, f"{uri}/health", tmp_path / "logs" / "bad-mlflow.log",
                       env=env, cwd=tmp_path):
        with pytest.raises(UltraFluxError, match=r"artifact store behind .* is not usable: could not write a probe"):
            check_artifact_store(uri)


def test_tracking_check_command_names_the_failing_step(failing_server, monkeypatch) -> None:
    """`ultraflux tracking check` against a server that answers TCP but fails every request: a clear error."""
    from typer.testing import CliRunner
    from ultraflux.cli import app

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    result = CliRunner().invoke(app, ["tracking", "check", "--uri", failing_server])
    assert isinstance(result.exception, UltraFluxError), result.output
    assert f"the artifact store behind {failing_server} is not usable: could not create a probe run" in str(
        result.exception)
