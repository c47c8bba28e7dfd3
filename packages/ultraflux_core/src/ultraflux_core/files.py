"""File primitives of checkpoints, releases, weights and the data stores: one sha256 and one link-or-copy."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of one file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Place ``src``'s bytes at ``dst`` by hard link (no second copy of multi-GB files) when the filesystem allows,
    else by copy; returns ``"link"`` or ``"copy"``.

    Both go through a unique temporary name and a rename, so ``dst`` is never seen half-written and a file
    already there is replaced. A link at ``src`` is followed: ``dst`` is always a regular file (``link()`` on
    Linux would otherwise hard-link the symlink itself, whose relative target then dangles).
    Fits ``shutil.copytree(copy_function=...)`` (which ignores the return value).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.link(src.resolve(), tmp)
        how = "link"
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, tmp)
        how = "copy"
    os.replace(tmp, dst)
    return how
