"""A release in the MLflow artifact store, content-addressed, and its way back to a local checkpoint directory.

Layout in the artifact store of the experiment that logs the release::

    <experiment artifacts>/blobs/<sha256>                    every checkpoint file once, named by its content
    <logged model>/artifacts/manifest.json                   path -> sha256 of each file of the checkpoint
    <logged model>/MLmodel, model_code.py, ...               the pyfunc flavor (serving/pyfunc.py)

WHY blobs beside the model rather than ``mlflow.pyfunc.log_model(artifacts={"checkpoint": dir})``: MLflow copies
``artifacts`` into every logged model, so each release would upload the whole checkpoint again (12B transformer,
T5, VAE: tens of GB) although a release usually changes one component. Keyed by sha256, a file that an earlier
release already stored (the text encoders, an unchanged VAE) is found by one listing of ``blobs/`` and not sent
again, and a blob can never be overwritten with other bytes. The logged model stays a small, real MLflow model
(``models:/…`` URIs, registry versions, ``mlflow models serve``); its manifest names exactly which bytes make the
checkpoint, so the content hash of the manifest is also the key of the local download cache: two URIs that name
the same weights share one cached copy, and a cached copy is never stale.

Blobs are read and written through MLflow's own artifact repositories (``mlflow-artifacts:`` through the tracking
server's proxy, ``s3://``, local files), so clients need only the tracking URI, never store credentials of their own
when the server proxies artifacts.

Logging a release (the writing side, which needs the pyfunc flavor and so the model package) lives in
``ultraflux_model.serving.publish``; this module is the storage layout and the way back, which
``pretrained.resolve_checkpoint`` uses without importing any model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ultraflux_model.errors import UltraFluxError
from ultraflux_model.filesystem import file_sha256, link_or_copy

MANIFEST_FORMAT = "ultraflux-release/1"
MANIFEST_NAME = "manifest.json"
BLOBS_DIR = "blobs"
CACHE_ENV = "ULTRAFLUX_MODEL_CACHE"
_SKIP_FILES = frozenset({".ultraflux-fingerprint.json"})  # a local hash cache, not part of the weights


@dataclass(frozen=True)
class Manifest:
    """Which bytes make a checkpoint: ``files`` maps each relative path to ``(sha256, size)``.

    ``blob_root`` is the artifact URI of the blob store; ``content_hash`` covers paths and file hashes only, so
    the same weights have the same hash wherever they are stored.
    """

    files: dict[str, tuple[str, int]]
    blob_root: str

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for path, (sha, _) in sorted(self.files.items()):
            digest.update(f"{path}\0{sha}\n".encode())
        return digest.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files.values())

    def to_json(self) -> str:
        files = [{"path": p, "sha256": s, "size": n} for p, (s, n) in sorted(self.files.items())]
        body = {"format": MANIFEST_FORMAT, "content_hash": self.content_hash, "blob_root": self.blob_root,
                "files": files}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            body = json.loads(Path(path).read_text())
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            manifest = cls({f["path"]: (f["sha256"], int(f["size"])) for f in body["files"]}, body["blob_root"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UltraFluxError(f"{path} is not an UltraFlux release manifest ({err})") from err
        if manifest.content_hash != body.get("content_hash"):
            raise UltraFluxError(f"{path}: content_hash does not match its file list (a corrupted manifest)")
        for rel in manifest.files:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise UltraFluxError(f"{path}: file path {rel!r} escapes the checkpoint directory")
        return manifest


def build_manifest(checkpoint: Path, blob_root: str) -> Manifest:
    """Hash every file of a checkpoint directory (``checkpoint`` is e.g. an assembled release)."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): (file_sha256(p), p.stat().st_size)
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name not in _SKIP_FILES
    }
    if not files:
        raise UltraFluxError(f"checkpoint {checkpoint} has no files to release")
    return Manifest(files, blob_root)


def _repository(artifact_uri: str, tracking_uri: str | None):  # noqa: ANN202 - mlflow's ArtifactRepository
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def upload_missing_blobs(checkpoint: Path, manifest: Manifest, tracking_uri: str | None) -> list[str]:
    """Store the checkpoint's files under ``blob_root/<sha256>`` unless already there; returns the hashes sent.

    One listing of the blob store decides what is missing (no per-file round trips). Identical files inside
    the checkpoint are sent once. Concurrent releases may both send a missing blob: same key, same bytes.
    """
    repo = _repository(manifest.blob_root, tracking_uri)
    present = {Path(info.path).name for info in repo.list_artifacts() if not info.is_dir}
    by_hash = {sha: checkpoint / rel for rel, (sha, _) in manifest.files.items()}
    missing = sorted(sha for sha in by_hash if sha not in present)
    with tempfile.TemporaryDirectory(prefix="ultraflux-blobs-") as tmp:
        for sha in missing:
            staged = Path(tmp) / sha  # the artifact repository names the object after the local file
            link_or_copy(by_hash[sha], staged)
            repo.log_artifact(str(staged))
            staged.unlink()
    return missing


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
    repo = _repository(manifest.blob_root, tracking_uri)
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
            local = Path(_repository(source, tracking_uri).download_artifacts("", dst_path=tmp))
        except (UltraFluxError, MlflowException, OSError) as err:
            raise UltraFluxError(
                f"cannot resolve {model_uri} at {tracking_uri} ({err}). Set MLFLOW_TRACKING_URI to the tracking "
                "server that holds the model, and check the name, version or alias"
            ) from err
        manifest_path = local / "artifacts" / MANIFEST_NAME
        if not manifest_path.is_file():
            raise UltraFluxError(
                f"{model_uri} is not an UltraFlux release (no artifacts/{MANIFEST_NAME}); log releases with "
                "flows/release_flow.py or ultraflux_model.serving.publish.log_release"
            )
        return Manifest.read(manifest_path)


def fetch_release(model_uri: str, cache_root: Path | None = None, tracking_uri: str | None = None) -> Path:
    """``models:/name@alias``, ``models:/name/version``, ``models:/<model_id>`` or ``runs:/<run>/<path>`` → local dir.

    Reads the manifest to learn the content hash; the weights come from the cache when that hash is there.
    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI`` (MLflow's default store without it).
    """
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    return materialize(release_manifest(model_uri, tracking_uri), cache_root, tracking_uri)
