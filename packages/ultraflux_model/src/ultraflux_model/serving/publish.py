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


def register_adapter(adapter_dir: Path, tracking_uri: str, run_id: str, base_uri: str,
                     name: str = "ultraflux-lora") -> str:  # fmt: skip
    """Register a LoRA adapter folder as a version of registered model ``name``, naming its base release; returns the
    version.

    ``base_uri`` is the release the adapter was trained on (``models:/ultraflux@champion``, ``models:/ultraflux/3``):
    it is resolved to its version, fetched through the verified cache and the adapter is checked against it
    (``UltraFluxError`` for an adapter of other weights, before anything is written). The adapter's two files are
    logged under run ``run_id`` (artifact path ``lora/<folder name>``); the version's description and its
    ``ultraflux.base_*`` tags name the base model, version and URI. Serve it by its URI
    (``serving_config(lora={"style": "models:/ultraflux-lora/1"})``).
    """
    from ultraflux_core.tracking.uri import client_for, registered_version

    from ultraflux_model.checkpoint.resolve import resolve_checkpoint
    from ultraflux_model.lora.adapters import ADAPTER_FILE, META_FILE
    from ultraflux_model.lora.apply import base_fingerprints, check_base, read_adapter

    adapter = read_adapter(adapter_dir)
    base_name, base_version = registered_version(tracking_uri, base_uri)
    pinned = f"models:/{base_name}/{base_version}"
    check_base(adapter, base_fingerprints(resolve_checkpoint(pinned, tracking_uri)))
    client = client_for(tracking_uri)
    artifact_path = f"lora/{adapter.name}"
    for file in (ADAPTER_FILE, META_FILE):
        client.log_artifact(run_id, str(adapter.folder / file), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"ultraflux.kind": "lora", "ultraflux.base_model": base_name, "ultraflux.base_version": base_version,
            "ultraflux.base_uri": pinned, "ultraflux.base_fingerprint": str(adapter.meta["base_fingerprint"]),
            "ultraflux.adapter_sha256": adapter.sha256, "ultraflux.rank": str(adapter.rank),
            "ultraflux.alpha": str(adapter.alpha), "ultraflux.targets": str(adapter.meta["targets"])}  # fmt: skip
    description = (f"LoRA adapter {adapter.name} (rank {adapter.rank}, alpha {adapter.alpha:g}, "
                   f"targets {adapter.meta['targets']}) for {base_name} version {base_version} ({pinned}, requested as "
                   f"{base_uri}); use it with that release only")  # fmt: skip
    try:
        client.create_registered_model(name)
    except Exception as err:  # noqa: BLE001 - MlflowException; an existing model is fine
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")):
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    return str(version.version)
