"""Symlinks in checkpoint folders: a link that leaves the folder (the attack: ``tokenizer/vocab.txt -> a secret``)
is refused by assembly, the manifest and the upload, and nothing reaches the artifact store; links inside the
folder and a Hugging Face snapshot's links into its ``blobs/`` are read, and releases hold regular files only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.checkpoint.files import checkpoint_files
from ultraflux_model.checkpoint.layout import assemble_checkpoint
from ultraflux_model.release.manifest import build_manifest, upload_missing_blobs

SECRET = b"AWS_SECRET_ACCESS_KEY=do-not-ship\n"


@pytest.fixture()
def planted(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny checkpoint whose ``tokenizer/`` holds a link to a secret file outside it."""
    secret = tmp_path / "home" / "credentials"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    root = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (root / "tokenizer" / "added_tokens.json").symlink_to(secret)
    return root, secret


def test_outside_link_is_refused_by_assembly_manifest_and_upload(planted, tiny_checkpoint, tmp_path):
    root, _ = planted
    with pytest.raises(UltraFluxError, match="added_tokens.json is a link to .*outside checkpoint"):
        checkpoint_files(root)
    with pytest.raises(UltraFluxError, match="outside checkpoint"):
        assemble_checkpoint(root, tmp_path / "release", {})
    assert not (tmp_path / "release").exists() and not (tmp_path / "release.tmp").exists()
    with pytest.raises(UltraFluxError, match="outside checkpoint"):
        build_manifest(root, (tmp_path / "store").as_uri())
    # a replacement component with a link out is refused too
    trained = shutil.copytree(tiny_checkpoint / "transformer", tmp_path / "trained")
    (trained / "extra.json").symlink_to(planted[1])
    with pytest.raises(UltraFluxError, match="extra.json is a link"):
        assemble_checkpoint(tiny_checkpoint, tmp_path / "release", {"transformer": trained})
    assert not (tmp_path / "release").exists()


def test_upload_rechecks_the_folder_a_manifest_was_built_from(planted, tiny_checkpoint, tmp_path):
    """The manifest was built from clean files; the folder then gains a link out (swapped between hashing and
    uploading): the upload refuses and the blob store receives nothing."""
    root, secret = planted
    (root / "tokenizer" / "added_tokens.json").unlink()
    manifest = build_manifest(root, (tmp_path / "store").as_uri())
    target = root / "tokenizer" / "tokenizer_config.json"
    assert "tokenizer/tokenizer_config.json" in manifest.files
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(UltraFluxError, match="outside checkpoint"):
        upload_missing_blobs(root, manifest, None)
    assert not (tmp_path / "store").exists()


def test_links_inside_and_hugging_face_blob_links_are_followed_into_regular_files(tiny_checkpoint, tmp_path):
    # a Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    for i, source in enumerate(p for p in sorted(tiny_checkpoint.rglob("*")) if p.is_file()):
        blob = repo / "blobs" / f"{i:04d}"
        shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(tiny_checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    # one more link inside the checkpoint itself
    (snapshot / "scheduler" / "copy.json").symlink_to("scheduler_config.json")
    files = checkpoint_files(snapshot)
    assert Path("scheduler/copy.json") in files and Path("transformer/config.json") in files
    manifest = build_manifest(snapshot, (tmp_path / "store").as_uri())
    assert manifest.files["scheduler/copy.json"][0] == manifest.files["scheduler/scheduler_config.json"][0]
    release = assemble_checkpoint(snapshot, tmp_path / "release", {})
    copied = [p for p in release.rglob("*") if not p.is_dir()]
    assert copied and not [p for p in copied if p.is_symlink()]  # a release holds regular files only
    # the same blobs are outside a folder that is not a snapshot of that repo: refused
    other = tmp_path / "not-a-snapshot"
    shutil.copytree(snapshot, other, symlinks=True)
    with pytest.raises(UltraFluxError, match="outside checkpoint"):
        checkpoint_files(other)


def test_link_to_a_folder_outside_is_refused(tiny_checkpoint, tmp_path):
    root = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "id_rsa").write_bytes(SECRET)
    (root / "vae" / "keys").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UltraFluxError, match="keys is a link to .*outside checkpoint"):
        checkpoint_files(root)
    with pytest.raises(UltraFluxError, match="outside checkpoint"):
        assemble_checkpoint(root, tmp_path / "release", {})
    assert not (tmp_path / "release").exists()
