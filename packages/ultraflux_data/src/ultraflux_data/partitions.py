"""Deterministic partitions, atomic writes and locks: what makes every data stage resumable and safe to run twice.

- A partition is a range of the content-hash key space: ``partition_of(key, count)`` takes the top 32 bits of
  the sha256 key, so the same keys always land in the same partition whatever the order of the input, and
  ``count`` is a power of two (doubling it splits every range in two).
- A partition's output is named by its index, the count and the hash of its inputs, inside a folder named by
  the hash of the settings: a finished file is never recomputed, and new inputs or settings never reuse it.
- Every file is written under a unique temporary name in its destination folder, then renamed
  (``os.replace`` is atomic on POSIX), so a reader or a killed writer never sees half a file, and two writers of
  the same file each rename a complete copy.
- ``partition_lock``: a writer holds a ``filelock`` on a partition while it computes it, so a concurrent run
  waits for it and then skips it instead of computing it twice; the lock dies with its process (fcntl), so a
  killed run leaves no stale lock.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock
from ultraflux_core.files import atomic_write

KEY_BITS = 32  # the first 8 hex digits of the sha256 key


def content_hash(payload: Any, length: int = 16) -> str:
    """Short sha256 of a JSON-serialisable payload (sorted keys; Paths and other objects as strings)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def partition_count(items: int, per_partition: int) -> int:
    """Smallest power of two ≥ ``items / per_partition`` (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1.0, items / per_partition))))


def partition_of(key: str, count: int) -> int:
    """Index of the key-hash range ``key`` falls in (``key``: hex sha256; ``count``: a power of two)."""
    return (int(key[:8], 16) * count) >> KEY_BITS


def split_by_key(frame: pd.DataFrame, per_partition: int,
                 key: str = "key") -> tuple[int, list[tuple[int, pd.DataFrame]]]:
    """``(count, [(index, rows sorted by key), ...])`` for the non-empty key ranges, in index order."""
    count = partition_count(len(frame), per_partition)
    if frame.empty:
        return count, []
    ordered = frame.sort_values(key, kind="stable").reset_index(drop=True)
    index = ordered[key].map(lambda k: partition_of(str(k), count))
    return count, [(int(i), rows.reset_index(drop=True)) for i, rows in ordered.groupby(index, sort=True)]


def part_name(index: int, count: int, inputs_hash: str, suffix: str) -> str:
    """``p00003of00016-<inputs hash><suffix>``: index, count and inputs in the name, so a finished file is proof."""
    return f"p{index:05d}of{count:05d}-{inputs_hash}{suffix}"


def atomic_parquet(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda fh: frame.to_parquet(fh, index=False))


def partition_lock(path: Path) -> FileLock:
    """The lock guarding the computation of the partition output ``path`` (a sibling ``.lock`` file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))


def stage_lock(folder: Path, stage: str) -> FileLock:
    """The lock a stage holds while it commits its index (and prunes files the index no longer lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".{stage}.commit.lock"))
