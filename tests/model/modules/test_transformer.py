"""UltraFlux DiT: official fixture parity (output and intermediates), equivalence with stock diffusers Flux on
other configs, gradient checkpointing, strict loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from ultraflux_core.errors import UltraFluxError
from ultraflux_model import UltraFluxTransformer2DModel
from ultraflux_model.diffusion.latents import image_ids, text_ids
from ultraflux_model.modules.rope import ResonanceYarnPosEmbed


@pytest.fixture(scope="module")
def official(reference_fixtures):
    root = reference_fixtures / "transformer"
    model = UltraFluxTransformer2DModel.from_pretrained(root / "model").eval()
    return model, load_file(root / "io.safetensors")


def _call(model, io):
    return model(
        io["hidden_states"], encoder_hidden_states=io["encoder_hidden_states"], pooled_projections=io["pooled_projections"],
        timestep=io["timestep"], img_ids=io["img_ids"], txt_ids=io["txt_ids"], guidance=io["guidance"], return_dict=False,
    )[0]


def test_matches_official_output_and_intermediates(official):
    model, io = official
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    blocks = [("double0", model.transformer_blocks[0])] + [(f"single{i}", b) for i, b in enumerate(model.single_transformer_blocks)]
    hooks = [b.register_forward_hook(lambda m, a, out, n=name: captured.__setitem__(n, out)) for name, b in blocks]
    temb = {}
    hooks.append(model.time_text_embed.register_forward_hook(lambda m, a, out: temb.setdefault("t", out)))
    with torch.no_grad():
        out = _call(model, io)
        cos, sin = model.pos_embed(torch.cat([io["txt_ids"], io["img_ids"]]))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, io["output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(temb["t"], io["inter.temb"], atol=1e-5, rtol=1e-5)
    rows = io["inter.rope_row_index"]
    torch.testing.assert_close(cos[rows], io["inter.rope_cos"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[rows], io["inter.rope_sin"], atol=1e-6, rtol=0)
    tokens = io["inter.token_index"]
    for name in ("double0", "single0", "single1"):
        text, image = captured[name]
        torch.testing.assert_close(text, io[f"inter.{name}.encoder_hidden_states"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image[:, tokens], io[f"inter.{name}.hidden_states_sel"], atol=1e-5, rtol=1e-5)


def test_accepts_3d_ids_as_the_official_model(official):
    model, io = official
    with torch.no_grad():
        out = model(
            io["hidden_states"], encoder_hidden_states=io["encoder_hidden_states"], pooled_projections=io["pooled_projections"],
            timestep=io["timestep"], img_ids=io["img_ids"][None], txt_ids=io["txt_ids"][None], guidance=io["guidance"],
            return_dict=False,
        )[0]
    torch.testing.assert_close(out, io["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "grid,window,guidance",
    [((12, 5), (4, 4), True), ((3, 17), (8, 6), False), ((6, 6), (64, 64), True)],
)
def test_equals_stock_diffusers_flux_with_resonance_pos_embed(grid, window, guidance):
    """Independent check on other configs/grids: stock diffusers Flux + our pos-embed == our class."""
    kwargs = dict(
        in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(3)
    ours = UltraFluxTransformer2DModel(**kwargs, rope_train_tokens_hw=window).eval()
    stock = FluxTransformer2DModel(**kwargs).eval()
    stock.load_state_dict(ours.state_dict())
    stock.pos_embed = ResonanceYarnPosEmbed(axes_dim=(4, 6, 6), train_tokens_hw=window)
    h, w = grid
    g = torch.Generator().manual_seed(0)
    args = dict(
        hidden_states=torch.randn(2, h * w, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
        pooled_projections=torch.randn(2, 10, generator=g), timestep=torch.tensor([0.3, 0.9]),
        img_ids=image_ids(h, w), txt_ids=text_ids(5), guidance=torch.tensor([4.0, 2.0]) if guidance else None,
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(**args)[0], stock(**args)[0], atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(official):
    _, io = official
    grads = []
    for checkpointing in (False, True):
        model = _fresh(official[0])
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        _call(model, io).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def _fresh(model: UltraFluxTransformer2DModel) -> UltraFluxTransformer2DModel:
    clone = UltraFluxTransformer2DModel.from_config(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def test_save_load_round_trip_and_sharding(official, tmp_path):
    model, io = official
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["rope_train_tokens_hw"] == [64, 64] and config["method"] == "yarn"
    with torch.no_grad():
        for sub in ("single", "sharded"):
            loaded = UltraFluxTransformer2DModel.from_pretrained(tmp_path / sub).eval()
            torch.testing.assert_close(_call(loaded, io), io["output"], atol=1e-5, rtol=1e-5)


def test_training_window_is_a_config_field(official, reference_fixtures, tmp_path):
    _, io = official
    shutil.copytree(reference_fixtures / "transformer" / "model", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_train_tokens_hw"] = [128, 128]  # the 80x40 grid now fits: plain RoPE, a different output
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    wide = UltraFluxTransformer2DModel.from_pretrained(tmp_path / "m").eval()
    assert wide.pos_embed.train_tokens_hw == (128, 128)
    with torch.no_grad():
        assert not torch.allclose(_call(wide, io), io["output"], atol=1e-3)


def test_unknown_config_key_is_rejected(reference_fixtures, tmp_path):
    shutil.copytree(reference_fixtures / "transformer" / "model", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_layer"] = 3  # typo of num_layers
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UltraFluxError, match="num_layer"):
        UltraFluxTransformer2DModel.from_pretrained(tmp_path / "m")


def test_pickled_weights_are_refused_and_missing_weights_named(reference_fixtures, tmp_path):
    src = reference_fixtures / "transformer" / "model"
    (tmp_path / "pickled").mkdir()
    shutil.copy(src / "config.json", tmp_path / "pickled")
    torch.save(load_file(src / "diffusion_pytorch_model.safetensors"), tmp_path / "pickled" / "diffusion_pytorch_model.bin")
    with pytest.raises(UltraFluxError, match="refusing to unpickle"):
        UltraFluxTransformer2DModel.from_pretrained(tmp_path / "pickled")
    (tmp_path / "empty").mkdir()
    shutil.copy(src / "config.json", tmp_path / "empty")
    with pytest.raises(UltraFluxError, match="weights are missing"):
        UltraFluxTransformer2DModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(UltraFluxError, match="does not exist"):
        UltraFluxTransformer2DModel.from_pretrained(tmp_path / "nowhere")
    save_file({"x": torch.zeros(1)}, tmp_path / "empty" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UltraFluxError, match="missing_keys: .*unexpected_keys: x"):
        UltraFluxTransformer2DModel.from_pretrained(tmp_path / "empty")
