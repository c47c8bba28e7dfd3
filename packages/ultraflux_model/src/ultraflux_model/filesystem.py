"""File primitives the checkpoint code shares. No model imports, so ``pretrained`` and ``release`` (which
``pretrained`` imports) can both use them."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Hard-link ``src`` at ``dst`` (no second copy of multi-GB weights), else copy it; returns ``dst``.

    Fits ``shutil.copytree(copy_function=...)``.
    """
    try:
        os.link(src, dst)
        return str(dst)
    except OSError:  # other filesystem, or links not allowed
        return shutil.copy2(src, dst)


def file_sha256(path: Path) -> str:
    """sha256 of one file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
