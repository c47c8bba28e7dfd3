"""A release in the MLflow artifact store, content-addressed: the manifest and the blob store (writing side).

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

Logging a release (with the pyfunc flavor) is ``ultraflux_model.serving.publish``; the way back to a local
directory (the verified download cache) is ``ultraflux_model.release.fetch``, which
``ultraflux_model.checkpoint.resolve`` uses without importing any model code.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256, link_or_copy

from ultraflux_model.checkpoint.files import checkpoint_files

MANIFEST_FORMAT = "ultraflux-release/1"
MANIFEST_NAME = "manifest.json"
BLOBS_DIR = "blobs"
LOCAL_FILES = frozenset({".ultraflux-fingerprint.json"})  # a local hash cache, not part of the weights


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
    """Hash every file of a checkpoint directory (``checkpoint`` is e.g. an assembled release); a link that leaves
    the directory is refused (:func:`ultraflux_model.checkpoint.files.checkpoint_files`)."""
    checkpoint = Path(checkpoint)
    files = {
        str(rel): (file_sha256(checkpoint / rel), (checkpoint / rel).stat().st_size)
        for rel in checkpoint_files(checkpoint)
        if rel.name not in LOCAL_FILES
    }
    if not files:
        raise UltraFluxError(f"checkpoint {checkpoint} has no files to release")
    return Manifest(files, blob_root)


def artifact_repository(artifact_uri: str, tracking_uri: str | None):  # noqa: ANN202 - mlflow's ArtifactRepository
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def upload_missing_blobs(checkpoint: Path, manifest: Manifest, tracking_uri: str | None) -> list[str]:
    """Store the checkpoint's files under ``blob_root/<sha256>`` unless already there; returns the hashes sent.

    One listing of the blob store decides what is missing (no per-file round trips). Identical files inside
    the checkpoint are sent once. Concurrent releases may both send a missing blob: same key, same bytes. Only
    files inside ``checkpoint`` are sent: a manifest path that is (now) a link leaving it is refused before any
    upload.
    """
    inside = {str(rel) for rel in checkpoint_files(checkpoint)}
    outside = sorted(rel for rel in manifest.files if rel not in inside)
    if outside:
        raise UltraFluxError(f"{checkpoint}: {outside[0]} is not a file inside the checkpoint; nothing uploaded")
    repo = artifact_repository(manifest.blob_root, tracking_uri)
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
