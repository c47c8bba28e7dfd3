"""The last known mapping of a registry URI to a release, kept beside the model cache, so a release already in the
cache still resolves by alias when the tracking server is down (with a warning: the alias may have moved since).

One JSON file per cache root (``<cache>/aliases.json``), ``{"<tracking uri> <model uri>": {"version",
"content_hash"}}``, rewritten atomically after every successful resolution, and the release's manifest beside its
folder (``<cache>/<content_hash>.manifest.json``) so the cache's own checks (marker, sizes, hashes) can still run
without the server.
"""

from __future__ import annotations

import json
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import atomic_bytes

from ultraflux_model.release.manifest import Manifest

RECORD = "aliases.json"
MANIFEST_SUFFIX = ".manifest.json"


def _key(tracking_uri: str, model_uri: str) -> str:
    return f"{tracking_uri} {model_uri}"


def _read(root: Path) -> dict[str, dict[str, str]]:
    try:
        return json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def remember(root: Path, tracking_uri: str, model_uri: str, version: str | None, manifest: Manifest) -> None:
    """Record that ``model_uri`` at ``tracking_uri`` named ``version`` = ``manifest`` (atomic rewrites)."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    atomic_bytes(root / f"{manifest.content_hash}{MANIFEST_SUFFIX}", manifest.to_json().encode())
    with FileLock(str(root / f"{RECORD}.lock")):
        records = _read(root)
        records[_key(tracking_uri, model_uri)] = {"version": version or "", "content_hash": manifest.content_hash}
        atomic_bytes(root / RECORD, json.dumps(records, indent=1, sort_keys=True).encode())


def last_known(root: Path, tracking_uri: str, model_uri: str) -> tuple[str, Manifest] | None:
    """``(version, manifest)`` that ``model_uri`` named when last resolved here, or None (never resolved, or its
    manifest is gone or corrupt)."""
    record = _read(root).get(_key(tracking_uri, model_uri))
    if not record:
        return None
    try:
        manifest = Manifest.read(root / f"{record['content_hash']}{MANIFEST_SUFFIX}")
    except (UltraFluxError, KeyError):
        return None
    if manifest.content_hash != record["content_hash"]:
        return None
    return record.get("version", ""), manifest
