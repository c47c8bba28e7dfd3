"""Log a checkpoint as a content-addressed MLflow model with the pyfunc flavor (the storage layout and the way back
to a local directory are in ``ultraflux_model.release.manifest``)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultraflux_model.checkpoint.layout import check_checkpoint_layout
from ultraflux_model.release.manifest import BLOBS_DIR, MANIFEST_NAME, Manifest, build_manifest, upload_missing_blobs
from ultraflux_model.serving.pyfunc import save_pyfunc_model, serving_config


@dataclass(frozen=True)
class LoggedRelease:
    """A checkpoint logged as an MLflow model: ``model_uri`` (``models:/<model_id>``) is what registry versions
    point at; ``uploaded`` lists the blobs this release had to send."""

    model_id: str
    model_uri: str
    manifest: Manifest
    uploaded: list[str]


def log_release(
    checkpoint: Path,
    tracking_uri: str,
    run_id: str,
    serving: dict[str, Any] | None = None,
    name: str = "ultraflux",
) -> LoggedRelease:
    """Log ``checkpoint`` as a pyfunc MLflow model of run ``run_id`` (blobs content-addressed, see the module doc).

    ``serving`` is the served model's config (generation defaults and request ceilings,
    :func:`ultraflux_model.serving.pyfunc.serving_config`); it defaults to ``GenerateConfig()``'s values.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    checkpoint = Path(checkpoint)
    check_checkpoint_layout(checkpoint)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    manifest = build_manifest(checkpoint, f"{experiment.artifact_location.rstrip('/')}/{BLOBS_DIR}")
    uploaded = upload_missing_blobs(checkpoint, manifest, tracking_uri)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, model_type="text-to-image",
        tags={"ultraflux.content_hash": manifest.content_hash, "ultraflux.bytes": str(manifest.total_bytes)},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ultraflux-model-") as tmp:
            manifest_path = Path(tmp) / MANIFEST_NAME
            manifest_path.write_text(manifest.to_json())
            mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                                 model_id=logged.model_id)
            local = Path(tmp) / "model"
            save_pyfunc_model(local, manifest_path, serving or serving_config(), mlflow_model)
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return LoggedRelease(logged.model_id, f"models:/{logged.model_id}", manifest, uploaded)
