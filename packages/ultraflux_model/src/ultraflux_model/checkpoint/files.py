"""The files of a checkpoint folder, none of them outside it: what assembly, manifests and uploads read.

A symlink inside a checkpoint that points elsewhere (``transformer/x.safetensors -> ~/.ssh/id_rsa``) would make
every reader that follows links (copying, hashing, uploading) carry that file into a release and the artifact
store. The one exception is a Hugging Face snapshot (``.../models--org--name/snapshots/<rev>``), whose files are
by design links into the same repo's ``blobs/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ultraflux_core.errors import UltraFluxError


def _hf_blobs(root: Path) -> Path | None:
    """``<repo>/blobs`` when ``root`` is ``<repo>/snapshots/<revision>`` of a Hugging Face cache, else None."""
    repo = root.parent.parent
    return repo / "blobs" if root.parent.name == "snapshots" and (repo / "blobs").is_dir() else None


def checkpoint_files(root: Path | str) -> list[Path]:
    """Every regular file under ``root`` (relative paths, sorted), following links only while they stay inside.

    Raises ``UltraFluxError`` naming the first entry whose resolved path leaves ``root`` (files of a Hugging Face
    snapshot may resolve into its repo's ``blobs/``), and for links to anything but a regular file or directory.
    """
    given = Path(root)
    base = given.resolve()
    blobs = _hf_blobs(base)
    allowed = (base,) if blobs is None else (base, blobs.resolve())
    files: list[Path] = []
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if not real.is_relative_to(base):
            raise UltraFluxError(
                f"{given / here.relative_to(base)} is a link to {real}, outside checkpoint {given}; "
                "refusing to read it (copy the files into the checkpoint instead)"
            )
        if real in seen:  # a link cycle, or a second link to a folder inside: read each folder once
            dirnames.clear()
            continue
        seen.add(real)
        for name in filenames:
            path = here / name
            target = path.resolve()
            if not any(target.is_relative_to(a) for a in allowed):
                raise UltraFluxError(
                    f"{given / path.relative_to(base)} is a link to {target}, outside checkpoint "
                    f"{given}; refusing to read it (copy the file into the checkpoint instead)"
                )
            if not target.is_file():
                raise UltraFluxError(f"{given / path.relative_to(base)} is not a regular file ({target})")
            files.append(path.relative_to(base))
    return sorted(files)
