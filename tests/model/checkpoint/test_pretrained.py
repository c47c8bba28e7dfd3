"""Checkpoint layout helpers: assembling a release checkpoint, fingerprints."""

from __future__ import annotations

import shutil

import pytest
import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_model import UltraFluxTransformer2DModel
from ultraflux_model.checkpoint.layout import assemble_checkpoint, check_checkpoint_layout, fingerprint


def test_assemble_replaces_one_component_and_keeps_the_rest(tiny_checkpoint, tmp_path):
    trained = UltraFluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer")
    with torch.no_grad():
        trained.proj_out.bias.add_(1.0)
    trained.save_pretrained(tmp_path / "export")
    out = assemble_checkpoint(tiny_checkpoint, tmp_path / "release", {"transformer": tmp_path / "export", "vae": None})
    check_checkpoint_layout(out)
    loaded = UltraFluxTransformer2DModel.from_pretrained(out / "transformer")
    torch.testing.assert_close(loaded.proj_out.bias, trained.proj_out.bias)
    assert (out / "vae" / "config.json").read_bytes() == (tiny_checkpoint / "vae" / "config.json").read_bytes()
    assert fingerprint(out / "transformer") != fingerprint(tiny_checkpoint / "transformer")
    assert fingerprint(out / "vae") == fingerprint(tiny_checkpoint / "vae")
    assert not (tmp_path / "release.tmp").exists()


def test_failed_assembly_leaves_the_previous_release_intact(tiny_checkpoint, tmp_path):
    out = assemble_checkpoint(tiny_checkpoint, tmp_path / "release", {})
    before = fingerprint(out)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint / "vae", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UltraFluxError, match="weights are missing"):
        assemble_checkpoint(tiny_checkpoint, out, {"vae": broken})
    with pytest.raises(UltraFluxError, match="cannot replace 'unet'"):
        assemble_checkpoint(tiny_checkpoint, out, {"unet": broken})
    assert fingerprint(out) == before


def test_fingerprint_follows_content_not_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"1234")
    first = fingerprint(tmp_path / "a")
    assert fingerprint(tmp_path / "a") == first  # cached
    (tmp_path / "a" / "w.safetensors").write_bytes(b"1235")
    assert fingerprint(tmp_path / "a") != first
