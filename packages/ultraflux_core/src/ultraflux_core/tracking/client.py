"""How our MLflow clients talk to a tracking server (the root config's ``tracking.http``), applied as MLflow's own
environment variables so every client in the process, ours or MLflow's internals, follows them."""

from __future__ import annotations

import os

from pydantic import Field

from ultraflux_core.config import Section


class HttpClientConfig(Section):
    """How an MLflow client talks to a tracking server: bounded retries (MLflow's own defaults retry for about 4
    minutes before any message) and artifacts always through the server (no presigned URLs naming the server's S3
    endpoint, which clients often cannot reach). Applied as MLflow's environment variables whenever our code opens
    a client (:func:`apply_client_settings`); a variable you export yourself wins."""

    max_retries: int = Field(2, ge=0, description="MLFLOW_HTTP_REQUEST_MAX_RETRIES (MLflow's default: 7)")
    backoff_factor: int = Field(1, ge=0, description="MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (MLflow's default: 2)")
    timeout_s: int = Field(30, ge=1, description="MLFLOW_HTTP_REQUEST_TIMEOUT per request (MLflow's default: 120)")
    proxy_multipart: bool = Field(
        False, description="MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD/_UPLOAD: false keeps every byte proxied through "
        "the server, so a client needs only the tracking URI (MLflow's default: ask the server, which then hands "
        "out presigned URLs of its own S3 endpoint)")

    def environment(self) -> dict[str, str]:
        """The MLflow environment variables these settings stand for."""
        multipart = "true" if self.proxy_multipart else "false"
        return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.max_retries),
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.backoff_factor),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s),
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": multipart,
                "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": multipart}


_APPLIED: dict[str, str] = {}  # the MLflow variables this process set itself (vs. exported by the user)


def apply_client_settings(settings: HttpClientConfig | None = None) -> None:
    """Bounded retries and proxied artifacts (``settings``, else the defaults) as MLflow's environment variables,
    read by MLflow at each request. A variable the user exported is left alone; one this function set before is
    updated."""
    for key, value in (settings or HttpClientConfig()).environment().items():
        if key in os.environ and _APPLIED.get(key) != os.environ[key]:
            continue  # the user's own setting
        os.environ[key] = _APPLIED[key] = value
