"""The release download cache under attack: a planted folder named by a release's hash (zeroed transformer, with
no marker or a forged one), a half-copied folder, a folder whose files shrank after it was verified, and a cache
root other users may write into. Each is refused or downloaded again; the served folder always matches the
manifest byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256
from ultraflux_model.checkpoint.layout import fingerprint
from ultraflux_model.release import fetch
from ultraflux_model.release.fetch import VERIFIED_SUFFIX, materialize
from ultraflux_model.release.manifest import build_manifest, upload_missing_blobs

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def logged(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's blobs stored once in a local artifact store (the releases' layout, through MLflow's
    artifact repository): (manifest, tracking uri: none needed for a file store)."""
    manifest = build_manifest(tiny_checkpoint, (tmp_path_factory.mktemp("store") / "blobs").as_uri())
    upload_missing_blobs(tiny_checkpoint, manifest, None)
    return manifest, None


@pytest.fixture()
def release(logged):
    fetch._HASHED.clear()  # each test is a fresh process: nothing hashed yet
    return logged


def _plant(tiny_checkpoint: Path, folder: Path, marker: str | None) -> None:
    """The release's files, but the transformer's weights zeroed (same size), and optionally a marker."""
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns(".ultraflux-fingerprint.json"))
    size = (folder / WEIGHTS).stat().st_size
    (folder / WEIGHTS).write_bytes(bytes(size))
    if marker is not None:
        folder.with_name(folder.name + VERIFIED_SUFFIX).write_text(marker)


@pytest.mark.parametrize("marker", [None, "forged"], ids=["no-marker", "forged-marker"])
def test_planted_folder_is_never_served(release, tiny_checkpoint, tmp_path, marker):
    manifest, uri = release
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    planted = root / manifest.content_hash
    _plant(tiny_checkpoint, planted, manifest.content_hash if marker == "forged" else None)
    served = materialize(manifest, root, uri)
    assert served == planted
    assert fingerprint(served) == fingerprint(tiny_checkpoint)  # downloaded again: the real weights
    assert (root / (manifest.content_hash + VERIFIED_SUFFIX)).read_text().strip() == manifest.content_hash
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # nothing set aside left over


def test_half_copied_folder_is_never_used(release, tiny_checkpoint, tmp_path):
    manifest, uri = release
    root = tmp_path / "cache"
    first = materialize(manifest, root, uri)
    # an interrupted copy: a folder with some of the files, one of them cut short; the marker is still there
    (first / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with (first / WEIGHTS).open("r+b") as fh:
        fh.truncate(100)
    assert materialize(manifest, root, uri) == first
    assert fingerprint(first) == fingerprint(tiny_checkpoint)
    # a half-copied folder without any marker (the copy died before it): downloaded again too
    (root / (manifest.content_hash + VERIFIED_SUFFIX)).unlink()
    (first / WEIGHTS).unlink()
    assert fingerprint(materialize(manifest, root, uri)) == fingerprint(tiny_checkpoint)


def test_same_size_tampering_is_caught_on_first_use_in_a_process(release, tiny_checkpoint, tmp_path):
    """A verified folder whose weights are overwritten with same-size zeros between processes (the marker, the
    file list and the sizes all still match): the first use in the next process hashes and re-downloads."""
    manifest, uri = release
    root = tmp_path / "cache"
    folder = materialize(manifest, root, uri)
    size = (folder / WEIGHTS).stat().st_size
    (folder / WEIGHTS).write_bytes(bytes(size))
    fetch._HASHED.clear()  # the next process
    assert fingerprint(materialize(manifest, root, uri)) == fingerprint(tiny_checkpoint)


def test_a_verified_folder_is_hashed_once_per_process_and_size_checked_every_time(release, tmp_path, monkeypatch):
    """Multi-GB weights are not re-hashed on every resolution: the first use in a process hashes, later uses
    compare sizes (a file cut short is still caught)."""
    manifest, uri = release
    root = tmp_path / "cache"
    folder = materialize(manifest, root, uri)
    fetch._HASHED.clear()  # the next process
    hashed = []
    monkeypatch.setattr(fetch, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    assert materialize(manifest, root, uri) == folder and len(hashed) == len(manifest.files)
    hashed.clear()
    assert materialize(manifest, root, uri) == folder and hashed == []
    with (folder / WEIGHTS).open("r+b") as fh:
        fh.truncate(10)
    assert materialize(manifest, root, uri) == folder and (folder / WEIGHTS).stat().st_size > 10  # fetched again


def test_cache_root_of_others_is_refused_and_new_roots_are_private(release, tmp_path):
    manifest, uri = release
    new = tmp_path / "fresh" / "models"
    materialize(manifest, new, uri)
    assert new.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UltraFluxError, match="writable by other users"):
        materialize(manifest, shared, uri)
    shared.chmod(0o775)
    with pytest.raises(UltraFluxError, match="writable by other users"):
        materialize(manifest, shared, uri)
    assert list(shared.iterdir()) == []  # nothing written into it
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(UltraFluxError, match="belongs to user id 65534"):
        materialize(manifest, foreign, uri)
