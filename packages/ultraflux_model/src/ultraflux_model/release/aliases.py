"""The last known mapping of a registry URI to a release, kept beside the model cache, so a release already in the
cache still resolves by alias when the tracking server is down (with a warning: the alias may have moved since).

One JSON file per cache root (``<cache>/aliases.json``), ``{"<tracking uri> <model uri>": {"version",
"content_hash"}}``, rewritten atomically after every successful resolution.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

from ultraflux_core.tracking.uri import TrackingUnavailable

RECORD = "aliases.json"


def _key(tracking_uri: str, model_uri: str) -> str:
    return f"{tracking_uri} {model_uri}"


def _read(root: Path) -> dict[str, dict[str, str]]:
    try:
        return json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def remember(root: Path, tracking_uri: str, model_uri: str, version: str | None, content_hash: str) -> None:
    """Record that ``model_uri`` at ``tracking_uri`` named ``version`` with ``content_hash`` (atomic rewrite)."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{RECORD}.lock")):
        records = _read(root)
        records[_key(tracking_uri, model_uri)] = {"version": version or "", "content_hash": content_hash}
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{RECORD}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(records, fh, indent=1, sort_keys=True)
        os.replace(tmp, root / RECORD)


def cached_release(root: Path, tracking_uri: str, model_uri: str, err: TrackingUnavailable) -> Path:
    """The cached release ``model_uri`` last resolved to, with a warning; re-raises ``err`` (the server's own
    message) when there is no record or its release is not in the cache."""
    record = _read(root).get(_key(tracking_uri, model_uri))
    folder = root / record["content_hash"] if record else None
    if folder is None or not folder.is_dir():
        raise err
    warnings.warn(f"{err} Using the cached release {folder.name} that {model_uri} named when last resolved "
                  f"(version {record['version'] or '?'}); it may have moved since.", stacklevel=2)
    return folder
