"""A release's way back from the MLflow artifact store to a local checkpoint directory: the manifest read through
the registry, the blobs downloaded once into the content-addressed cache (``$ULTRAFLUX_MODEL_CACHE``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256
from ultraflux_core.tracking.uri import TrackingUnavailable, transport_failure, unavailable

from ultraflux_model.release.manifest import MANIFEST_NAME, Manifest, artifact_repository

CACHE_ENV = "ULTRAFLUX_MODEL_CACHE"


def model_cache_root() -> Path:
    """``$ULTRAFLUX_MODEL_CACHE``, else ``$XDG_CACHE_HOME/ultraflux/models`` (``~/.cache/ultraflux/models``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ultraflux" / "models"


def materialize(manifest: Manifest, cache_root: Path | None = None, tracking_uri: str | None = None) -> Path:
    """The checkpoint of ``manifest`` as a local directory ``<cache_root>/<content_hash>``, downloaded once.

    Concurrent callers (processes, hosts sharing the cache) serialise on a lock file per hash; the download goes
    to a private temporary directory, every blob is checked against its sha256, and the directory is renamed
    into place only when complete, so a present ``<content_hash>`` directory is always a whole checkpoint.
    """
    from filelock import FileLock

    root = Path(cache_root or model_cache_root())
    final = root / manifest.content_hash
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{manifest.content_hash}.lock")):
        if final.is_dir():  # another process finished it while we waited
            return final
        staging = root / f".{manifest.content_hash}.{uuid.uuid4().hex}.tmp"
        try:
            _download_blobs(manifest, staging, tracking_uri)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _download_blobs(manifest: Manifest, staging: Path, tracking_uri: str | None) -> None:
    repo = artifact_repository(manifest.blob_root, tracking_uri)
    (staging / ".blobs").mkdir(parents=True)
    fetched: dict[str, Path] = {}
    for rel, (sha, _) in sorted(manifest.files.items()):
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if sha in fetched:  # the same bytes twice in one checkpoint: one download
            shutil.copyfile(fetched[sha], target)
            continue
        try:
            local = Path(repo.download_artifacts(sha, dst_path=str(staging / ".blobs")))
        except Exception as err:  # the artifact stores raise many types; the blob and store are what matter
            raise UltraFluxError(
                f"cannot download blob {sha} ({rel}) from {manifest.blob_root}: {err}. Check that the tracking "
                "server (MLFLOW_TRACKING_URI) and its artifact store are reachable"
            ) from err
        if file_sha256(local) != sha:
            raise UltraFluxError(f"blob {sha} ({rel}) from {manifest.blob_root} does not match its sha256")
        local.rename(target)
        fetched[sha] = target
    shutil.rmtree(staging / ".blobs", ignore_errors=True)


def release_manifest(model_uri: str, tracking_uri: str) -> Manifest:
    """The manifest of the release at ``model_uri`` (only the small model directory is downloaded)."""
    from mlflow.exceptions import MlflowException
    from ultraflux_core.tracking.uri import model_download_uri

    with tempfile.TemporaryDirectory(prefix="ultraflux-manifest-") as tmp:
        try:
            source = model_download_uri(tracking_uri, model_uri)
            local = Path(artifact_repository(source, tracking_uri).download_artifacts("", dst_path=tmp))
        except TrackingUnavailable:
            raise
        except (UltraFluxError, MlflowException, OSError) as err:
            if transport_failure(err):
                raise unavailable(tracking_uri, err) from err
            raise UltraFluxError(
                f"cannot resolve {model_uri} at {tracking_uri} ({err}). Set MLFLOW_TRACKING_URI to the tracking "
                "server that holds the model, and check the name, version or alias"
            ) from err
        manifest_path = local / "artifacts" / MANIFEST_NAME
        if not manifest_path.is_file():
            raise UltraFluxError(
                f"{model_uri} is not an UltraFlux release (no artifacts/{MANIFEST_NAME}); log releases with "
                "flows/release_flow.py or ultraflux_model.release.publish.log_release"
            )
        return Manifest.read(manifest_path)


def fetch_release(model_uri: str, cache_root: Path | None = None, tracking_uri: str | None = None) -> Path:
    """``models:/name@alias``, ``models:/name/version``, ``models:/<model_id>`` or ``runs:/<run>/<path>`` → local dir.

    Reads the manifest to learn the content hash; the weights come from the cache when that hash is there.
    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI`` (MLflow's default store without it).
    """
    import mlflow
    from ultraflux_core.tracking.client import apply_client_settings
    from ultraflux_core.tracking.uri import is_registered_model_uri, registered_version

    from ultraflux_model.release.aliases import cached_release, remember

    apply_client_settings()
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    root = Path(cache_root or model_cache_root())
    try:
        manifest = release_manifest(model_uri, tracking_uri)
    except TrackingUnavailable as err:  # server down: the last known mapping, if its release is cached
        return cached_release(root, tracking_uri, model_uri, err)
    version = registered_version(tracking_uri, model_uri)[1] if is_registered_model_uri(model_uri) else None
    folder = materialize(manifest, root, tracking_uri)
    remember(root, tracking_uri, model_uri, version, manifest.content_hash)
    return folder
