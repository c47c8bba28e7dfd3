"""File primitives of checkpoints, releases, weights and the data stores: one sha256, one link-or-copy, one capped
copy, one atomic single-file write, and the folder commit (with its commit marker) every data stage writes its
outputs through."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ultraflux_core.errors import UltraFluxError


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of one file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a unique temporary file in its folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_bytes(path: Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda fh: fh.write(data))


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


class TooLarge(OSError):
    """``copy_capped`` stopped: the source holds more than the cap (it may have grown since it was checked)."""


def copy_capped(src: str | os.PathLike, dst: str | os.PathLike, max_bytes: int) -> int:
    """Copy ``src`` into a new file ``dst``; returns the bytes copied.

    A copy, never a link: ``dst`` shares no inode with ``src``, so editing the source later cannot change it.
    ``os.copy_file_range`` lets filesystems that can (btrfs, XFS) share extents copy-on-write (a reflink) and
    others copy in the kernel; a plain read/write loop is the fallback. Never holds the file in memory, and
    raises ``TooLarge`` (removing ``dst``) once more than ``max_bytes`` would be copied.
    """
    want = max_bytes + 1  # one byte more than allowed is enough to know it is too large
    copied = 0
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            try:
                while copied < want and (n := os.copy_file_range(fin.fileno(), fout.fileno(), want - copied)):
                    copied += n
            except OSError:  # not supported between these filesystems: copy through user space
                fin.seek(copied)
                fout.seek(copied)
                while copied < want and (block := fin.read(min(1 << 20, want - copied))):
                    fout.write(block)
                    copied += len(block)
            if copied > max_bytes:
                raise TooLarge(f"more than max_bytes={max_bytes} bytes")
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        Path(dst).unlink(missing_ok=True)
        raise
    return copied


# ---- folder commits: a stage's outputs appear together or not at all ----

COMMIT_MARKER = "_commit.json"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def uncommitted_siblings(dest: str | os.PathLike) -> list[Path]:
    """Folders ``commit_folder`` left beside ``dest`` when its writer was killed (remove them under the stage's
    lock: another writer's live folder looks the same)."""
    dest = Path(dest)
    return sorted(p for p in dest.parent.glob(f"{dest.name}.tmp-*") if p.is_dir())


@contextmanager
def commit_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty sibling folder of ``dest``; when the block ends normally its files are fsynced and the
    folder replaces ``dest`` in one rename, so readers see the whole old folder or the whole new one.

    On Linux the swap is ``renameat2(RENAME_EXCHANGE)`` (``dest`` never disappears); elsewhere ``dest`` is renamed
    aside first, leaving a moment where it is missing but never partial. If the block raises (or the process is
    killed) ``dest`` is untouched; the sibling is removed, or left for ``uncommitted_siblings`` after a kill.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_path(path)
        _fsync_path(tmp)
        if not dest.exists():
            os.rename(tmp, dest)
        elif not _exchange(tmp, dest):
            aside = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(dest, aside)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(aside, dest)  # put the old commit back rather than lose it
                raise
            tmp = aside
        _fsync_path(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the uncommitted folder, or the old one after a swap


def write_commit_marker(folder: str | os.PathLike, names: list[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/_commit.json`` (the sha256 of each named file, plus ``extra``) last, once they are whole."""
    folder = Path(folder)
    payload = {"files": {name: file_sha256(folder / name) for name in sorted(names)}, **(extra or {})}
    marker = folder / COMMIT_MARKER
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, marker)
    return marker


def read_committed(folder: str | os.PathLike, names: list[str], producer: str) -> dict[str, bytes]:
    """The bytes of the named files of a committed ``folder``, each checked against its commit marker.

    Marker and files are opened relative to one descriptor of the folder, so they come from the same commit even
    if a new one is swapped in meanwhile, and each file is read once (``pyarrow.parquet.read_table(path)`` opens a
    file twice — footer, then pages — and can pair two commits' halves). Raises ``UltraFluxError`` naming
    ``producer`` (the command to re-run) when the marker is missing or a file is missing or differs: the folder
    was written by an interrupted or older run, or edited afterwards.
    """
    folder = Path(folder)
    for attempt in range(5):
        try:
            return _read_committed(folder, names, producer)
        except FileNotFoundError:  # a commit's old folder removed under us: read the new one
            if attempt == 4:
                break
            time.sleep(0.05)
    raise UltraFluxError(f"{folder} or a file of it is missing: run `{producer}` again")


def _read_committed(folder: Path, names: list[str], producer: str) -> dict[str, bytes]:
    """One attempt of ``read_committed``; ``FileNotFoundError`` when a new commit replaced the folder under us."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def read(name: str) -> bytes | None:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                if os.stat(folder).st_ino != os.fstat(dir_fd).st_ino:
                    raise  # our folder was swapped out and is being removed: retry on the new one
                return None
            with os.fdopen(fd, "rb") as fh:
                return fh.read()

        marker = read(COMMIT_MARKER)
        if marker is None:
            raise UltraFluxError(
                f"{folder} has no {COMMIT_MARKER} (written by an interrupted or older run): run `{producer}` again"
            )
        try:
            files = json.loads(marker)["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not a mapping")
        except (ValueError, KeyError, TypeError) as err:
            raise UltraFluxError(
                f"{folder / COMMIT_MARKER} is not a valid commit marker: run `{producer}` again"
            ) from err
        out = {}
        for name in names:
            data = read(name)
            if name not in files or data is None or hashlib.sha256(data).hexdigest() != files[name]:
                raise UltraFluxError(
                    f"{folder / name} is not the file `{producer}` committed (missing, changed or from another run): "
                    f"run `{producer}` again"
                )
            out[name] = data
        return out
    finally:
        os.close(dir_fd)
