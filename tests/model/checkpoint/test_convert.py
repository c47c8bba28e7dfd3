"""``ultraflux convert``: FLUX.1-dev → UltraFlux layout and assembled checkpoints, on tiny stand-ins built offline.

The FLUX.1-dev stand-in uses the stock diffusers classes and configs (``FluxTransformer2DModel`` without
UltraFlux keys, ``AutoencoderKL`` without ``stride``, a dynamic-shifting scheduler), exactly as the hub
checkpoint is laid out; the converted checkpoint then goes through our loader and generates an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux.config import load_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.checkpoint.convert import convert_flux_dev
from ultraflux_model.checkpoint.tiny import MODEL_INDEX, POOLED_DIM, TEXT_DIM, tiny_clip, tiny_t5, write_tiny_checkpoint
from ultraflux_model.config import GenerateConfig
from ultraflux_model.inference.pipeline import generate_from_config
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.training.curriculum import stage_band
from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> Path:
    """A tiny checkpoint in the diffusers FLUX.1-dev layout, stock classes, random weights."""
    root = tmp_path_factory.mktemp("flux-dev")
    torch.manual_seed(0)
    FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(root / "transformer")
    AutoencoderKL(  # the FLUX.1-dev VAE config keys, tiny widths
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(root / "vae")
    clip, clip_tok = tiny_clip()
    clip.save_pretrained(root / "text_encoder")
    clip_tok.save_pretrained(root / "tokenizer")
    t5, t5_tok = tiny_t5()
    t5.save_pretrained(root / "text_encoder_2")
    t5_tok.save_pretrained(root / "tokenizer_2")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.save_pretrained(root / "scheduler")  # FLUX.1-dev's: dynamic shifting
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root


def test_convert_flux_dev_keeps_weights_adds_yarn_and_f16(flux_dev, tmp_path):
    result = CliRunner().invoke(app, ["convert", "flux-dev", str(flux_dev), str(tmp_path / "uf")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "uf"
    src_cfg = json.loads((flux_dev / "transformer/config.json").read_text())
    cfg = json.loads((out / "transformer/config.json").read_text())
    assert cfg == {**src_cfg, "method": "yarn"}
    assert json.loads((out / "vae/config.json").read_text())["stride"] == 2
    assert "stride" not in json.loads((flux_dev / "vae/config.json").read_text())  # the source is untouched
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for src_file in (flux_dev / part).glob("*.safetensors"):
            dst_file = out / part / src_file.name
            assert dst_file.stat().st_ino == src_file.stat().st_ino  # hard-linked: weights unchanged, no copy
    for part in ("tokenizer", "tokenizer_2", "scheduler"):
        assert sorted(p.name for p in (out / part).iterdir()) == sorted(p.name for p in (flux_dev / part).iterdir())

    transformer = UltraFluxTransformer2DModel.from_pretrained(out / "transformer")
    want = load_file(flux_dev / "transformer/diffusion_pytorch_model.safetensors")
    got = transformer.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    vae = UltraFluxAutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.stride == 2
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert vae.encode(image).latent_dist.mean.shape == (1, 16, 4, 4)  # 16x: the F16 VAE

    cfg_gen = GenerateConfig(model=str(out), prompts=("a red fox",), sizes=((64, 64),), steps=2, dtype="fp32",
                             out=tmp_path / "gen", max_sequence_length=16)
    (image,) = generate_from_config(cfg_gen, progress=False)
    assert (image.width, image.height) == (64, 64) and image.path.is_file()


def test_convert_refuses_bad_sources_without_writing(flux_dev, tmp_path):
    with pytest.raises(UltraFluxError, match="already exists"):
        convert_flux_dev(flux_dev, tmp_path)
    with pytest.raises(UltraFluxError, match="not an F16 VAE"):
        convert_flux_dev(flux_dev, tmp_path / "a", vae=str(flux_dev / "vae"))
    ultraflux = write_tiny_checkpoint(tmp_path / "uf-v1")
    with pytest.raises(UltraFluxError, match="not a complete UltraFlux checkpoint"):
        convert_flux_dev(tmp_path / "uf-v1" / "transformer", tmp_path / "b")
    # an existing F16 VAE (here the tiny UltraFlux one) can replace the f16 initialisation
    out = convert_flux_dev(flux_dev, tmp_path / "c", vae=str(ultraflux))
    assert load_file(out / "vae/diffusion_pytorch_model.safetensors").keys() == load_file(
        ultraflux / "vae/diffusion_pytorch_model.safetensors"
    ).keys()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_finetune_preset_resolves_to_an_assembled_v1_1_checkpoint(tmp_path):
    base = write_tiny_checkpoint(tmp_path / "UltraFlux-v1", seed=0)
    newer = write_tiny_checkpoint(tmp_path / "v1-1", seed=1) / "transformer"  # stands in for UltraFlux-v1-1-Transformer
    dst = tmp_path / "checkpoints" / "UltraFlux-v1-1"
    result = CliRunner().invoke(app, ["convert", "assemble", str(base), str(dst), "--transformer", str(newer)])
    assert result.exit_code == 0, result.output
    cfg = load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml", ROOT / "configs/4k-finetune.yaml")
    assert cfg.train.model == "checkpoints/UltraFlux-v1-1" == cfg.generate.model
    assert cfg.data.filter.stage2_top == 0.05  # the paper's data settings come from 4k.yaml underneath
    model = tmp_path / cfg.train.model
    loaded = UltraFluxTransformer2DModel.from_pretrained(model / "transformer").state_dict()
    want = load_file(newer / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    assert (model / "vae/diffusion_pytorch_model.safetensors").stat().st_ino == (
        base / "vae/diffusion_pytorch_model.safetensors"
    ).stat().st_ino


def test_reproduce_preset_starts_from_the_converted_flux_dev_layout():
    cfg = load_config(ROOT / "params.yaml", ROOT / "configs/4k-reproduce.yaml")
    assert cfg.train.model == cfg.vae_train.model == str(cfg.data.cache.model) == "checkpoints/ultraflux-from-flux-dev"
    s1, s2 = cfg.train.stages
    band = stage_band(s2, cfg.train.timesteps)  # the paper's "0-459" read as scheduler indices: σ ≥ 0.541
    assert (s1.subset, s1.t_min, s1.steps) == ("all", 0.0, 30000)
    assert (s2.subset, band, s2.steps) == ("stage2", (0.541, 1.0), 2000)
    assert s1.lr == s2.lr == 1e-6 and cfg.data.filter.stage2_top == 0.05
    assert (ROOT / "configs/4k.yaml").resolve() == (ROOT / "configs/4k-reproduce.yaml").resolve()
