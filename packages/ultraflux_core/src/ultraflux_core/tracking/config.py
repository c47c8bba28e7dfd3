"""The tracking sections of the config tree: the root ``tracking`` section (``params.yaml: tracking``, the MLflow
store of training runs) and the registry's promotion rule (``params.yaml: eval.promotion``).

Here rather than in a package above, because the model (training), the evaluation and the flows all read them.
Endpoints are settings read when a run starts (:meth:`TrackingConfig.resolve_uri`), never at import.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ultraflux_core.config import Section
from ultraflux_core.tracking.uri import resolve_tracking_uri

RUN_STORE = "mlflow.db"  # the SQLite file a run directory holds when no tracking URI is set


class HttpClientConfig(Section):
    """How an MLflow client talks to a tracking server: bounded retries (MLflow's own defaults retry for about 4
    minutes before any message) and artifacts always through the server (no presigned URLs naming the server's S3
    endpoint, which clients often cannot reach). Applied as MLflow's environment variables whenever our code opens
    a client (:func:`ultraflux_core.tracking.uri.apply_client_settings`); a variable you export yourself wins."""

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


class TrackingConfig(Section):
    """MLflow tracking: a SQLite file in the run directory by default, a server by setting."""

    uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI if set, else sqlite:///<run dir>/mlflow.db"
    )
    experiment: str = "ultraflux-train"
    check_timeout_s: float = Field(5.0, gt=0.0, description="how long to wait for a server before giving up")
    http: HttpClientConfig = HttpClientConfig()

    def resolve_uri(self, run_dir: Path | str) -> str:
        """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db`` (an absolute path, so the
        run's store does not depend on the working directory of whoever reads it later)."""
        return resolve_tracking_uri(self.uri, (Path(run_dir) / RUN_STORE).resolve())


class PromotionConfig(Section):
    """Model-registry rule: the candidate takes the alias when ``metric`` beats the champion's by ``min_delta``."""

    model_name: str = "ultraflux"
    alias: str = "champion"
    metric: str = Field("clip_score/overall", description="a logged metric key, `<metric>/<aspect>`")
    higher_is_better: bool = True
    min_delta: float = Field(0.0, ge=0.0)
    lock_path: Path | None = Field(
        None, description="lock file serialising promotions on a local store (default: next to the sqlite file); "
        "a tracking server serialises them itself"
    )
