"""A release's way back from the MLflow artifact store to a local checkpoint directory: the manifest read through
the registry, the blobs downloaded once into the content-addressed cache (``$ULTRAFLUX_MODEL_CACHE``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import atomic_bytes, file_sha256
from ultraflux_core.tracking.uri import TrackingUnavailable, transport_failure, unavailable

from ultraflux_model.checkpoint.files import checkpoint_files
from ultraflux_model.release.manifest import LOCAL_FILES, MANIFEST_NAME, Manifest, artifact_repository

CACHE_ENV = "ULTRAFLUX_MODEL_CACHE"


def model_cache_root() -> Path:
    """``$ULTRAFLUX_MODEL_CACHE``, else ``$XDG_CACHE_HOME/ultraflux/models`` (``~/.cache/ultraflux/models``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ultraflux" / "models"


VERIFIED_SUFFIX = ".verified"  # ``<content_hash>.verified`` beside the folder, holding the manifest's hash
# (folder, content hash) whose every file this process has hashed: later uses re-check sizes only
_HASHED: set[tuple[Path, str]] = set()


def private_cache_root(root: Path) -> Path:
    """``root``, created 0700 if new; ``UltraFluxError`` if another user owns it or others may write into it.

    WHY: whoever can write into the cache can plant a folder named by a release's hash (a zeroed transformer)
    that the next ``models:/`` resolution would serve.
    """
    root = Path(root)
    if not root.exists():
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
        root.chmod(0o700)  # mkdir's mode is masked by the umask
    info = root.stat()
    if info.st_uid != os.getuid():
        raise UltraFluxError(
            f"model cache {root} belongs to user id {info.st_uid}, not to you ({os.getuid()}); set {CACHE_ENV} to a "
            "folder of your own"
        )
    if info.st_mode & 0o022:
        raise UltraFluxError(
            f"model cache {root} is writable by other users (mode {info.st_mode & 0o777:o}); `chmod go-w {root}` or "
            f"set {CACHE_ENV} to a private folder"
        )
    return root


def _verified(folder: Path, manifest: Manifest) -> bool:
    """Whether ``folder`` holds exactly ``manifest``'s files: its marker names the manifest, every size matches,
    and (once per process) every sha256 matches."""
    marker = folder.with_name(folder.name + VERIFIED_SUFFIX)
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.read_text().strip() != manifest.content_hash:
            return False
        present = {str(rel): rel for rel in checkpoint_files(folder) if rel.name not in LOCAL_FILES}
    except (OSError, UltraFluxError):  # no marker, or a link out of the folder: not a release we wrote
        return False
    if set(present) != set(manifest.files) or any((folder / rel).is_symlink() for rel in present):
        return False
    if any((folder / rel).stat().st_size != size for rel, (_, size) in manifest.files.items()):
        return False
    key = (folder.resolve(), manifest.content_hash)
    if key not in _HASHED:
        if any(file_sha256(folder / rel) != sha for rel, (sha, _) in manifest.files.items()):
            return False
        _HASHED.add(key)
    return True


def materialize(manifest: Manifest, cache_root: Path | None = None, tracking_uri: str | None = None) -> Path:
    """The checkpoint of ``manifest`` as a local directory ``<cache_root>/<content_hash>``, downloaded once.

    A cached folder is used only when its marker ``<content_hash>.verified`` (written after every downloaded
    blob matched its sha256) names this manifest, its files are exactly the manifest's, their sizes match, and,
    on the first use in a process, their hashes match; anything else (a planted folder, a half-copied one, a
    forged marker) is discarded and downloaded again. The cache root must be the user's own and not writable by
    others (:func:`private_cache_root`).

    Concurrent callers (processes, hosts sharing the cache) serialise on a lock file per hash; the download goes
    to a private temporary directory, every blob is checked against its sha256, and the directory is renamed
    into place only when complete.
    """
    from filelock import FileLock

    root = private_cache_root(Path(cache_root or model_cache_root()))
    final = root / manifest.content_hash
    if _verified(final, manifest):
        return final
    with FileLock(str(root / f"{manifest.content_hash}.lock")):
        if _verified(final, manifest):  # another process finished it while we waited
            return final
        marker = final.with_name(final.name + VERIFIED_SUFFIX)
        marker.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        if final.exists() or final.is_symlink():  # planted, half-copied or tampered: set aside, then removed
            stale = root / f".{manifest.content_hash}.{token}.stale"
            final.rename(stale)
            _remove(stale)
        staging = root / f".{manifest.content_hash}.{token}.tmp"
        try:
            _download_blobs(manifest, staging, tracking_uri)
            staging.rename(final)
        finally:
            _remove(staging)
        atomic_bytes(marker, (manifest.content_hash + "\n").encode())  # last: only a complete folder is marked
        _HASHED.add((final.resolve(), manifest.content_hash))  # every blob was hashed as it arrived
    return final


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else the demo's store ``artifacts/mlflow.db``; a
    SQLite store that does not exist is refused before MLflow could create an empty one.
    """
    from ultraflux_core.tracking.client import apply_client_settings
    from ultraflux_core.tracking.uri import (
        check_store_exists,
        default_tracking_uri,
        is_registered_model_uri,
        registered_version,
    )

    from ultraflux_model.release.aliases import remember

    apply_client_settings()
    tracking_uri = default_tracking_uri(tracking_uri)
    check_store_exists(tracking_uri)
    root = Path(cache_root or model_cache_root())
    try:
        manifest = release_manifest(model_uri, tracking_uri)
    except TrackingUnavailable as err:  # server down: the last known mapping, if its release is cached
        return _last_known_release(root, tracking_uri, model_uri, err)
    version = registered_version(tracking_uri, model_uri)[1] if is_registered_model_uri(model_uri) else None
    folder = materialize(manifest, root, tracking_uri)
    remember(root, tracking_uri, model_uri, version, manifest)
    return folder


def _last_known_release(root: Path, tracking_uri: str, model_uri: str, err: TrackingUnavailable) -> Path:
    """The cached release ``model_uri`` named when last resolved, with a warning; it passes the same checks as any
    cache hit (private root, marker, file set, sizes, hashes once per process). Otherwise ``err`` (the server's
    own message) is raised: a folder that merely exists is never served."""
    from ultraflux_model.release.aliases import last_known

    known = last_known(root, tracking_uri, model_uri)
    if known is None:
        raise err
    version, manifest = known
    folder = private_cache_root(root) / manifest.content_hash
    if not _verified(folder, manifest):
        raise err
    warnings.warn(f"{err} Using the cached release {folder.name} that {model_uri} named when last resolved "
                  f"(version {version or '?'}); it may have moved since.", stacklevel=3)
    return folder
