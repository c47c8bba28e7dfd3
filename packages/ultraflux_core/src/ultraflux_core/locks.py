"""Exclusive locks of a whole job (a data stage, a training run directory): a second run refuses at once, naming
the holder, instead of interleaving its writes with the first.

The lock is a ``filelock`` (``fcntl.flock`` on POSIX): it dies with its process, so a killed run leaves no stale
lock. Beside it, a ``.holder`` file names the holder (pid, host, start time) for the refusal message; it is
informational only (the flock decides).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ultraflux_core.errors import UltraFluxError


class LockHeld(UltraFluxError):
    """Another live process holds the lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown: it is starting or stopping)"


@contextmanager
def exclusive(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for the block, or raise ``LockHeld`` at once when another process holds it.

    ``what`` names the protected thing in the message (e.g. ``"data filter stage of artifacts/data"``).
    Refusing, not waiting: a second run of the same job would only redo or overwrite the first one's work.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = lock_path.with_name(lock_path.name + ".holder")
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockHeld(
            f"{what} is in use by {_holder(holder)}: wait for that run to finish or stop it (lock {lock_path})"
        ) from None
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
