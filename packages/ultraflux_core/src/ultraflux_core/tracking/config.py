"""The tracking sections of the config tree: the root ``tracking`` section (``params.yaml: tracking``, the MLflow
store of training runs) and the registry's promotion rule (``params.yaml: eval.promotion``).

Here rather than in a package above, because the model (training), the evaluation and the flows all read them.
Endpoints are settings read when a run starts (:meth:`TrackingConfig.resolve_uri`), never at import.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ultraflux_core.config import Section
from ultraflux_core.tracking.client import HttpClientConfig
from ultraflux_core.tracking.uri import resolve_tracking_uri

RUN_STORE = "mlflow.db"  # the SQLite file a run directory holds when no tracking URI is set


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
    lock_ttl_s: float = Field(
        60.0, gt=0.0, description="a tracking server's promotion lock expires this long after its last renewal "
        "(renewed every third of it while held): how long a killed promoter blocks the others"
    )
    lock_wait_s: float = Field(
        300.0, gt=0.0, description="how long a promotion waits for the lock before giving up; longer than "
        "lock_ttl_s, so a waiter outlasts a dead holder's lock"
    )

    @model_validator(mode="after")
    def _wait_outlasts_ttl(self) -> PromotionConfig:
        if self.lock_wait_s <= self.lock_ttl_s:
            raise ValueError(
                f"lock_wait_s ({self.lock_wait_s}) must exceed lock_ttl_s ({self.lock_ttl_s}): a waiter that gives up "
                "first never gets the lock of a promoter that died holding it"
            )
        return self
