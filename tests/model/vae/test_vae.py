"""F16 VAE: official encode/decode parity, tiled == full on other configs, official == shifted full, loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from ultraflux_core.errors import UltraFluxError
from ultraflux_model import UltraFluxAutoencoderKL


@pytest.fixture(scope="module")
def official(reference_fixtures):
    root = reference_fixtures / "vae"
    return UltraFluxAutoencoderKL.from_pretrained(root / "model").eval(), load_file(root / "io.safetensors")


def test_encode_matches_official(official):
    vae, io = official
    with torch.no_grad():
        dist = vae.encode(io["image"]).latent_dist
    torch.testing.assert_close(dist.mean, io["latent_mean"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist.logvar, io["latent_logvar"], atol=1e-5, rtol=1e-5)
    assert vae.spatial_factor == 4  # two blocks, stride 2: the fixture's 64x96 image has a 16x24 latent


@pytest.mark.parametrize("tile_pixels", [1 << 19, 200, 5])
def test_decode_modes_match_official(official, tile_pixels):
    vae, io = official
    with torch.no_grad():
        full = vae.decode(io["latent_in"], mode="full").sample
        tiled = vae.decode(io["latent_in"], mode="tiled", tile_pixels=tile_pixels).sample
        part = vae.decode(io["latent_in"], mode="official", tile_pixels=tile_pixels).sample
        part_mean = vae.decode(io["latent_mean"], mode="official", tile_pixels=tile_pixels).sample
    torch.testing.assert_close(full, io["decoded_unpartitioned"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(part, io["decoded_partitioned"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_mean, io["decoded_from_mean_partitioned"], atol=1e-5, rtol=1e-5)
    assert tiled.shape == part.shape == (1, 3, 64, 96)


def test_default_decode_is_tiled(official):
    vae, io = official
    with torch.no_grad():
        default = vae.decode(io["latent_in"]).sample
        tiled = vae.decode(io["latent_in"], mode="tiled").sample
    torch.testing.assert_close(default, tiled, atol=0, rtol=0)


@pytest.mark.parametrize(
    "blocks,layers,stride,latent_hw,shortcut",
    [((8, 16, 16), 2, 2, (5, 7), True), ((16, 16), 1, 1, (6, 3), False), ((8, 16, 32, 32), 1, 2, (4, 6), True)],
)
def test_tiled_equals_full_on_other_configs(blocks, layers, stride, latent_hw, shortcut):
    torch.manual_seed(0)
    vae = UltraFluxAutoencoderKL(
        block_out_channels=blocks, layers_per_block=layers, norm_num_groups=4, latent_channels=4, stride=stride,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
    ).eval()
    assert any(r.conv_shortcut is not None for b in vae.decoder.up_blocks for r in b.resnets) == shortcut
    with torch.no_grad():
        for p in vae.parameters():  # move off the default init so norms and biases matter
            p.add_(0.05 * torch.randn_like(p))
        z = torch.randn(2, 4, *latent_hw)
        full = vae.decode(z, mode="full").sample
        for tile in (7, 64, 1 << 20):
            tiled = vae.decode(z, mode="tiled", tile_pixels=tile).sample
            torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)
        official = vae.decode(z, mode="official", tile_pixels=13).sample
    torch.testing.assert_close(official[..., 1:, 1:], full[..., :-1, :-1], atol=1e-5, rtol=0)
    assert not torch.allclose(official[..., 0, :], full[..., 0, :], atol=1e-3)
    assert full.shape[-2:] == (latent_hw[0] * vae.spatial_factor, latent_hw[1] * vae.spatial_factor)


def test_save_load_round_trip(official, tmp_path):
    vae, io = official
    vae.save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["stride"] == 2
    loaded = UltraFluxAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(io["latent_in"], mode="official").sample, io["decoded_partitioned"],
                                   atol=1e-5, rtol=1e-5)


def test_bad_configs_and_modes(reference_fixtures, tmp_path, official):
    shutil.copytree(reference_fixtures / "vae" / "model", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["strides"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UltraFluxError, match="strides"):
        UltraFluxAutoencoderKL.from_pretrained(tmp_path / "m")
    with pytest.raises(UltraFluxError, match="stride must be 1 or 2"):
        UltraFluxAutoencoderKL(stride=4)
    with pytest.raises(UltraFluxError, match="decode mode"):
        official[0].decode(official[1]["latent_in"], mode="partitioned")
