"""``ultraflux plan``: model states equal DeepSpeed's estimators, activations equal a measured forward.

The activation oracle is what autograd itself holds for backward (``activation_probe.held_for_backward``:
saved-tensor hooks, unique storages, parameters excluded), measured on CPU at small width (bf16 and fp32)
and on a real-width model (FLUX.1-dev widths, one block of each kind) at two token counts.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
import torch
import yaml
from activation_probe import flux_inputs, held_for_backward
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux.config import load_config
from ultraflux.plan_cli import plan_config
from ultraflux_model.config import TimestepConfig
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.training.memory import (
    GB,
    FluxShape,
    activation_bytes,
    double_block_bytes,
    model_state_bytes,
    single_block_bytes,
)
from ultraflux_model.training.plan import count_parameters, format_plan, stage_batch
from ultraflux_model.training.timesteps import band_share, sample_timesteps

ROOT = Path(__file__).resolve().parents[3]
FLUX_DEV_PARAMS = 11_901_408_320  # FLUX.1-dev transformer, as published (and as its safetensors index sums)
ACTIVATION_RTOL = 1e-3  # the formula counts every saved tensor: it matches to the byte today


def shape_of(model: UltraFluxTransformer2DModel) -> FluxShape:
    return count_parameters(dict(model.config))[2]


@pytest.fixture(scope="module")
def flux_dev():
    return count_parameters({"guidance_embeds": True})


def test_parameter_count_is_flux_dev_and_matches_deepspeed_layer_accounting(flux_dev):
    from deepspeed.runtime.zero.stage3 import model_to_params

    params, largest, shape = flux_dev
    assert params == FLUX_DEV_PARAMS
    assert (shape.dim, shape.heads, shape.double_blocks, shape.single_blocks) == (3072, 24, 19, 38)
    torch.manual_seed(0)
    tiny = UltraFluxTransformer2DModel(num_layers=2, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(2, 3, 3))
    assert count_parameters(dict(tiny.config))[:2] == model_to_params(tiny)


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 2), (4, 1), (1, 1)])
def test_model_states_equal_deepspeed_estimators(flux_dev, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest, _ = flux_dev
    world = gpus * nodes
    ds3 = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                                cpu_offload_params=False, zero_init=True)[1]
    ds2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1]
    ours = {z: model_state_bytes(params, largest, zero_stage=z, precision="bf16", gpus=world).total for z in range(4)}
    assert abs(ours[3] - ds3) <= 1 and abs(ours[2] - ds2) <= 1  # DeepSpeed truncates to int
    # stage 1 keeps the bf16 gradients whole: stage 2 plus the (N−1)/N share of them
    assert ours[1] - ours[2] == pytest.approx(2 * params * (1 - 1 / world))
    assert ours[0] == 20 * params
    fp32 = model_state_bytes(params, largest, zero_stage=3, precision="fp32", gpus=world)
    assert fp32.total == pytest.approx(16 * params / world + 8 * largest)


@pytest.mark.parametrize("dtype,b", [(torch.bfloat16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("tokens", [(96, 8), (160, 24)])
def test_activation_formula_equals_saved_tensors_small_width(dtype, b, tokens):
    torch.manual_seed(0)
    model = UltraFluxTransformer2DModel(
        num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=4, in_channels=40,
        joint_attention_dim=48, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).to(dtype)
    model.set_rope_kernel("eager")
    n, t = tokens
    inputs = flux_inputs(model, n, t, dtype)
    shape = shape_of(model)
    plain = held_for_backward(model, inputs, checkpointing=False)
    ckpt = held_for_backward(model, inputs, checkpointing=True)
    assert plain["saved"] == activation_bytes(shape, n, t, micro_batch=1, b=b, checkpointing=False).held
    assert ckpt["saved"] + ckpt["checkpoint_inputs"] == activation_bytes(
        shape, n, t, micro_batch=1, b=b, checkpointing=True
    ).held


@pytest.fixture(scope="module")
def real_width_model():
    """FLUX.1-dev widths (3072 = 24 × 128, T5 4096, CLIP 768), one block of each kind, random bf16 weights."""
    with torch.device("meta"):
        model = UltraFluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    model.set_rope_kernel("eager")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("image_tokens", [256, 1024])
def test_activation_formula_matches_real_width_run(real_width_model, image_tokens):
    text_tokens = 64
    shape = shape_of(real_width_model)
    assert (shape.dim, shape.heads, shape.head_dim, shape.joint_dim, shape.pooled_dim) == (3072, 24, 128, 4096, 768)
    inputs = flux_inputs(real_width_model, image_tokens, text_tokens, torch.bfloat16)
    with open("/tmp/bigmem.lock", "w") as lock:  # one ~2 GB job at a time on the shared machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        plain = held_for_backward(real_width_model, inputs, checkpointing=False)
        ckpt = held_for_backward(real_width_model, inputs, checkpointing=True)
    want_plain = activation_bytes(shape, image_tokens, text_tokens, micro_batch=1, b=2, checkpointing=False)
    want_ckpt = activation_bytes(shape, image_tokens, text_tokens, micro_batch=1, b=2, checkpointing=True)
    assert plain["saved"] == pytest.approx(want_plain.held, rel=ACTIVATION_RTOL)
    assert ckpt["saved"] + ckpt["checkpoint_inputs"] == pytest.approx(want_ckpt.held, rel=ACTIVATION_RTOL)
    # recomputing the largest block in backward brings back exactly what the plain run holds for it
    blocks = sum(f(shape, image_tokens, text_tokens, 2) for f in (double_block_bytes, single_block_bytes))
    assert want_ckpt.recompute < blocks and plain["saved"] > ckpt["saved"] + ckpt["checkpoint_inputs"]


def test_band_share_equals_sampled_share():
    for cfg in (TimestepConfig(shift=3.0), TimestepConfig(shift=1.0), TimestepConfig(sampling="uniform")):
        t = sample_timesteps(200_000, cfg, generator=torch.Generator().manual_seed(0))
        assert band_share(cfg, (0.0, 1.0), (0.541, 1.0)) == pytest.approx((t >= 0.541).double().mean().item(), abs=4e-3)
    assert band_share(TimestepConfig(sampling="uniform"), (0.0, 1.0), (0.541, 1.0)) == pytest.approx(0.459)
    assert band_share(TimestepConfig(), (0.0, 0.5), (0.541, 1.0)) == 0.0


def test_plan_cli_json_for_the_paper_run(tmp_path):
    result = CliRunner().invoke(app, ["plan", "-c", str(ROOT / "params.yaml"), "-c", str(ROOT / "configs/4k.yaml"),
                                      "--gpus", "8", "--gpu-memory-gb", "80", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["params"] == FLUX_DEV_PARAMS
    assert plan["tokens"] == {"image": 16_512, "text": 512, "bucket": [6144, 2752]}  # 192 × 86 tokens
    pg = plan["per_gpu"]
    assert pg["model_states_excl_ema_gb"] == pytest.approx(
        (18 * FLUX_DEV_PARAMS / 8 + 4 * plan["largest_layer_params"]) / GB)
    parts = ("model_states_excl_ema_gb", "ema_gb", "reserve_gb", "activations_gb")
    assert pg["total_gb"] == pytest.approx(sum(pg[k] for k in parts))
    assert plan["fits"] is True and plan["max_micro_batch"] >= 1
    stage1, stage2 = plan["stages"]
    assert stage1["global_batch"] == stage2["global_batch"] == 64
    # the reproduction's law: σ uniform over FLUX.1-dev's unshifted training schedule, so 1 − 0.541 of the draws
    assert stage2["stage1_draws_in_band"] == pytest.approx(0.459)


def test_a_fit_with_little_headroom_is_marked_tight():
    """The attack: 4 × 80 GB reported as fitting at 77.9 GB (2 GB left) with nothing said."""
    cfg = load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml")
    roomy = plan_config(cfg, gpus=8, gpu_memory_gb=80)
    need = max(s["total_gb"] for s in roomy["stages"])
    for memory, tight in ((need / 0.97, True), (need / 0.85, False)):  # 3 % and 15 % left
        plan = plan_config(cfg, gpus=8, gpu_memory_gb=memory)
        assert plan["fits"] is True and plan["tight"] is tight
        assert ("tight" in format_plan(plan)) is tight
    over = plan_config(cfg, gpus=8, gpu_memory_gb=need * 0.9)
    assert over["fits"] is False and over["tight"] is False and min(s["headroom"] for s in over["stages"]) < 0


def test_largest_fitting_micro_batch_is_the_boundary(tmp_path):
    cfg = load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml")
    best = plan_config(cfg, gpus=8, gpu_memory_gb=80)["max_micro_batch"]
    stages = [s.model_dump() for s in cfg.train.stages]
    for micro, fits in ((best, True), (best + 1, False)):
        over = tmp_path / f"m{micro}.yaml"
        batch = {"micro_batch": micro, "global_batch": micro * 8}
        over.write_text(yaml.safe_dump({"train": {"stages": [{**stages[0], **batch}]}}))
        layered = load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml", over)
        assert stage_batch(layered.train.stages[0], 8)[0] == micro
        assert plan_config(layered, gpus=8, gpu_memory_gb=80)["fits"] is fits


def test_plan_reads_a_local_checkpoint_and_prints_a_table(tmp_path):
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["plan", "-c", str(ROOT / "params.yaml"), "--set", f"train.model={ckpt}",
                                      "--gpus", "2", "--gpu-memory-gb", "1"])
    assert result.exit_code == 0, result.output
    tiny_params = sum(p.numel() for p in UltraFluxTransformer2DModel.from_pretrained(ckpt / "transformer").parameters())
    assert f"transformer: {tiny_params:,} parameters" in result.output and "stage-1 draws in band" in result.output
    bad = CliRunner().invoke(app, ["plan", "--gpus", "0"])
    assert bad.exit_code != 0


def test_unshifted_band_reads_the_scheduler_index_band():
    """σ ≥ 0.541 on the unshifted schedule = scheduler indices 0–459 = shifted σ ≥ shift(0.541) = 0.7795 at shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    static = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False).sigmas
    cfg = TimestepConfig(sampling="uniform", shift=3.0, band_schedule="unshifted")
    t = sample_timesteps(50_000, cfg, 0.541, 1.0, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) == pytest.approx(float(static[459]), abs=1e-4) and float(t.max()) <= 1.0
    assert band_share(cfg, (0.0, 1.0), (0.541, 1.0)) == pytest.approx(0.459)
    shifted = TimestepConfig(sampling="uniform", shift=3.0)
    assert band_share(shifted, (0.0, 1.0), (0.541, 1.0)) == pytest.approx(1 - 0.541 / (3 - 2 * 0.541))


def test_lora_plan_counts_adapters_and_the_frozen_base():
    """LoRA rank 16 on the attention projections of FLUX.1-dev: 19 dual blocks × 8 and 38 single blocks × 3
    projections of 3072 → 3072, each r·(in + out) parameters; the adapters carry all optimizer states
    (DeepSpeed's 20 bytes per parameter for ZeRO-2 bf16 on one GPU), the base only its weights."""
    presets = [ROOT / "params.yaml", ROOT / "configs/4k.yaml", ROOT / "configs/lora-4k.yaml"]
    cfg24 = load_config(*presets, ROOT / "configs/lora-4k-48gb.yaml", ROOT / "configs/lora-4k-24gb.yaml")
    plan = plan_config(cfg24, gpus=1, gpu_memory_gb=24)
    lora, pg = plan["lora"], plan["per_gpu"]
    adapters = 16 * (3072 + 3072) * (19 * 8 + 38 * 3)
    assert plan["method"] == "lora" and lora["trainable_params"] == adapters and lora["base_params"] == FLUX_DEV_PARAMS
    assert pg["model_states_excl_ema_gb"] == pytest.approx(20 * adapters / GB)
    assert pg["ema_gb"] == pytest.approx(4 * adapters / GB)
    linear = sum(m.weight.numel() for m in _meta_flux_dev().modules() if isinstance(m, torch.nn.Linear))
    assert lora["base_dtype"] == "nf4"
    assert lora["frozen_base_gb"] == pytest.approx((linear * (0.5 + 4 / 64) + (FLUX_DEV_PARAMS - linear) * 2) / GB)
    parts = ("model_states_excl_ema_gb", "ema_gb", "reserve_gb", "activations_gb")
    assert pg["total_gb"] == pytest.approx(sum(pg[k] for k in parts) + lora["frozen_base_gb"])
    assert plan["fits"] and plan["gpu_fit"]["24"] in ("yes", "tight")
    bf16 = plan_config(load_config(*presets, ROOT / "configs/lora-4k-48gb.yaml"), gpus=1, gpu_memory_gb=48)
    assert bf16["lora"]["frozen_base_gb"] == pytest.approx(2 * FLUX_DEV_PARAMS / GB)
    assert bf16["gpu_fit"] == {"24": "NO", "48": "yes", "80": "yes"}
    assert "frozen base (bf16) 23.80" in format_plan(bf16) and "one GPU of 24 GB: NO" in format_plan(bf16)


def _meta_flux_dev() -> UltraFluxTransformer2DModel:
    with torch.device("meta"):
        return UltraFluxTransformer2DModel(guidance_embeds=True)


def test_plan_warns_on_settings_that_make_no_sense():
    """The defaults on 8 GPUs: accumulation 0.12 and a micro-batch of hundreds of thousands, said plainly."""
    result = CliRunner().invoke(app, ["plan", "-c", str(ROOT / "params.yaml"), "--gpus", "8"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert any("stage stage1: global_batch 2 is smaller than micro_batch 2 × 8 GPUs = 16 (accumulation 0.12 < 1)" in w
               for w in warnings)
    assert any("memory does not bound this run" in w for w in warnings)
    paper = plan_config(load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml"), gpus=8, gpu_memory_gb=80)
    assert paper["warnings"] == []  # the paper run: 64 = 1 × 8 GPUs × 8 accumulation, memory-bound
    uneven = plan_config(load_config(ROOT / "params.yaml", ROOT / "configs/4k.yaml"), gpus=6, gpu_memory_gb=80)
    assert any("is not a multiple of micro_batch" in w for w in uneven["warnings"])
