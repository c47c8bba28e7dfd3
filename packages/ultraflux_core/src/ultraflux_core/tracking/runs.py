"""A run in MLflow as the training loops log it: one run (optionally nested under a parent), params flattened
from the config tree, metrics per step, images and files as artifacts; inactive on non-zero ranks.

Default store: ``sqlite:///<run dir>/mlflow.db`` with artifacts beside it, so a run needs no server
(:meth:`ultraflux_core.tracking.config.TrackingConfig.resolve_uri`); a server that does not answer is reported
before any training work starts (:func:`ultraflux_core.tracking.uri.check_tracking_reachable`).
All calls go through an explicit ``MlflowClient`` bound to the run's URI (no process-global MLflow state).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARENT_TAG = "mlflow.parentRunId"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """One MLflow run (optionally nested under a parent); inactive on non-zero ranks."""

    def __init__(self, uri: str, experiment: str, *, active: bool, artifact_dir: Path | None = None) -> None:
        self.uri = uri
        self.active = active
        self.run_id: str | None = None
        self._client = None
        self._experiment_id: str | None = None
        if active:
            from ultraflux_core.tracking.uri import client_for

            self._client = client_for(uri)
            found = self._client.get_experiment_by_name(experiment)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                location = artifact_dir.resolve().as_uri() if artifact_dir and uri.startswith("sqlite:") else None
                self._experiment_id = self._client.create_experiment(experiment, artifact_location=location)

    def start(self, run_name: str, *, tags: Mapping[str, str] | None = None, parent: str | None = None,
              run_id: str | None = None) -> str | None:
        """Open a new run, or reopen ``run_id`` (resume); returns its id."""
        if not self.active:
            return None
        if run_id is not None:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent
        self.run_id = self._client.create_run(self._experiment_id, tags=all_tags, run_name=run_name).info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image: Any, artifact_file: str) -> None:
        if self.active:
            self._client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
