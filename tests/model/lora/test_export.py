"""Exported adapters in other tools' hands: the diffusers file in diffusers' own ``FluxPipeline`` reproduces our
generation with the adapter; the kohya/ComfyUI file goes back through diffusers' own kohya reader to the same weight
deltas (at Flux-dev's real widths, built on the meta device: LoRA tensors only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.diffusion.latents import unpack_latents
from ultraflux_model.inference.pipeline import load_pipeline, sample_latents
from ultraflux_model.lora.adapters import ADAPTER_FILE, META_FILE
from ultraflux_model.lora.apply import adapter_state_dict, read_adapter, read_specs, use_adapters
from ultraflux_model.lora.export import export_adapter
from ultraflux_model.modules.text_encoders import encode_prompts

RANK, ALPHA = 4, 8.0


def lora_shapes(preset: str, rank: int, layers: tuple[int, int] | None = None) -> dict[str, torch.Size]:
    """The diffusers-format keys and shapes of a ``preset`` adapter on the Flux-dev-width transformer (``layers``:
    double, single blocks; None: the full 19 + 38), found by peft itself on a model built on the meta device."""
    from diffusers import FluxPipeline  # noqa: F401 - the PEFT backend's imports
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from ultraflux_model.checkpoint.tiny import transformer_config
    from ultraflux_model.lora.targets import target_modules
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    with torch.device("meta"):
        model = UltraFluxTransformer2DModel(**transformer_config("flux-dev", *(layers or (None, None))))
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules(preset)), model)
    return {f"transformer.{key}": tensor.shape for key, tensor in get_peft_model_state_dict(model).items()}


def flux_dev_adapter(out: Path, preset: str, seed: int = 0) -> Path:
    """An adapter folder at Flux-dev widths (1 double + 1 single block), random A and B."""
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(preset, RANK, (1, 1))
    tensors = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in shapes.items()}
    out.mkdir(parents=True)
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    meta = {"base": "flux-dev widths", "base_fingerprint": "0" * 64, "rank": RANK, "alpha": ALPHA, "targets": preset,
            "method": "lora"}  # fmt: skip
    (out / META_FILE).write_text(json.dumps(meta))
    return out


def _deltas(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """module → scale · B · A · V (the weight delta of a diffusers-format LoRA applied to 8 fixed random inputs V:
    as telling as the delta itself, without building out × in matrices at Flux-dev widths)."""
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in state_dict}
    out = {}
    for m in modules:
        b, a = (state_dict[f"transformer.{m}.lora_{p}.weight"].double() for p in "BA")
        probe = torch.randn(a.shape[1], 8, generator=torch.Generator().manual_seed(a.shape[1]), dtype=torch.float64)
        out[m] = scale * (b @ (a @ probe))
    return out


@pytest.mark.parametrize("preset", ["attention", "all_linear"])
def test_kohya_file_reads_back_through_diffusers_converter(tmp_path, preset):
    from diffusers import FluxPipeline

    adapter = read_adapter(flux_dev_adapter(tmp_path / "adapter", preset))
    out = tmp_path / "kohya.safetensors"
    export_adapter(adapter, "kohya", out)
    kohya = load_file(str(out))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in kohya)  # fmt: skip
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in kohya
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in kohya

    back = FluxPipeline.lora_state_dict(str(out))  # detects the kohya layout and runs diffusers' own converter
    # diffusers 0.42 names the layers outside the blocks (img_in, txt_in, time_in, final_layer…) without its
    # "transformer." prefix (so its load_lora_weights skips them; docs/lora.md): compare by module all the same
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    expected, got = _deltas(adapter_state_dict(adapter), ALPHA / RANK), _deltas(back, 1.0)  # alpha folded in by it
    assert set(expected) <= set(got)
    for module, delta in expected.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-6, msg=module)
    extra = set(got) - set(expected)  # linear1's proj_mlp under the attention preset: zero blocks, zero delta
    assert extra == ({"single_transformer_blocks.0.proj_mlp"} if preset == "attention" else set())
    assert all(not got[m].any() for m in extra)


def test_diffusers_file_in_flux_pipeline_reproduces_our_generation(tiny_checkpoint, tiny_adapter, tmp_path):
    from diffusers import FluxPipeline
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    ours = load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")
    theirs = FluxPipeline(scheduler=ours.scheduler, vae=ours.vae, text_encoder=ours.text_encoder,
                          tokenizer=ours.tokenizer, text_encoder_2=ours.text_encoder_2, tokenizer_2=ours.tokenizer_2,
                          transformer=UltraFluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer"))
    theirs.set_progress_bar_config(disable=True)
    embeds, pooled = encode_prompts(ours, ["a red fox"], 512, device="cpu", dtype=torch.float32)
    vae = ours.vae.config

    def ours_latents() -> torch.Tensor:
        return sample_latents(ours, embeds, pooled, 64, 64, steps=2, guidance=4.0, shift=3.0, seed=3, progress=False)

    def theirs_latents() -> torch.Tensor:
        # FluxPipeline sizes latents by an 8x VAE; ours is 16x (F16): half the pixels give the same 4x4 latent grid
        seed = torch.Generator("cpu").manual_seed(3)
        packed = theirs(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32, num_inference_steps=2,
                        guidance_scale=4.0, generator=seed, output_type="latent").images
        return unpack_latents(packed, 4, 4) / vae.scaling_factor + vae.shift_factor

    base = ours_latents()
    torch.testing.assert_close(theirs_latents(), base, rtol=0, atol=1e-5)  # the two samplers agree without LoRA

    use_adapters(ours, read_specs([str(tiny_adapter)]))
    with_lora = ours_latents()
    assert (with_lora - base).abs().max() > 0.1  # the adapter matters

    raw = tiny_adapter / ADAPTER_FILE  # the training file as is: diffusers reads it with alpha = rank
    theirs.load_lora_weights(str(raw), adapter_name="raw")
    assert (theirs_latents() - with_lora).abs().max() > 0.01  # alpha 8 / rank 4 is lost: why the export bakes it
    theirs.delete_adapters("raw")

    exported = tmp_path / "style-a.safetensors"
    assert export_adapter(read_adapter(tiny_adapter), "diffusers", exported) == {"tensors": 22, "modules": 11}
    theirs.load_lora_weights(str(exported), adapter_name="exported")
    torch.testing.assert_close(theirs_latents(), with_lora, rtol=0, atol=1e-4)


def test_cli_export_both_formats_and_refusals(tiny_adapter, tmp_path):
    runner = CliRunner()
    for fmt, counts in (("diffusers", "22 tensors, 11 layers"), ("kohya", "15 tensors, 5 layers")):
        out = tmp_path / f"{fmt}.safetensors"
        result = runner.invoke(app, ["lora", "export", str(tiny_adapter), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert counts in result.output and out.is_file()
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    # the tiny model's attention preset: 4 fused/plain layers per double block, linear1 in the single block
    assert sorted({k.split(".")[0] for k in kohya}) == [
        "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
    ]  # fmt: skip
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 4 * RANK  # 4 members; alpha/rank is in up
    bad = runner.invoke(app, ["lora", "export", str(tiny_adapter), "--format", "ckpt", "--out", str(tmp_path / "x.pt")])
    assert isinstance(bad.exception, UltraFluxError) and "unknown LoRA export format 'ckpt'" in str(bad.exception)
    with pytest.raises(UltraFluxError, match=r"name it \*.safetensors"):
        export_adapter(read_adapter(tiny_adapter), "kohya", tmp_path / "x.pt")
