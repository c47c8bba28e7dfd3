"""The tracking sections: the root ``tracking`` section (where runs are logged)."""

from __future__ import annotations

from pydantic import Field

from ultraflux_core.config import Section


class TrackingConfig(Section):
    """MLflow tracking: a SQLite file in the run directory by default, a server by setting."""

    uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI if set, else sqlite:///<run dir>/mlflow.db"
    )
    experiment: str = "ultraflux-train"
    check_timeout_s: float = Field(5.0, gt=0.0, description="how long to wait for a server before giving up")
