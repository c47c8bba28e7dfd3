"""``ultraflux plan``: size a training run before GPUs are booked.

The parameter count is exact: the transformer is built from its ``config.json`` on the meta device (no
memory, no weights). Model states and activations come from ``training/memory.py``; the timestep shares from
the configured law (``training/timesteps.py``); the step time from the FLOPs of a step at an assumed MFU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import DeepSpeedConfig, StageConfig, TrainConfig
from ultraflux_model.training.memory import GB, Activations, FluxShape, activation_bytes, model_state_bytes

FLUX_DEV_OVERRIDES = {"guidance_embeds": True}  # FLUX.1-dev = the class defaults plus the guidance embedding
H200_BF16_DENSE_TFLOPS = 989.0


def transformer_config(model: str) -> tuple[dict[str, Any], str]:
    """The transformer ``config.json`` of a checkpoint (local dir, or a hub id already in the HF cache).

    Falls back to FLUX.1-dev's architecture (what UltraFlux-v1 has) when the checkpoint is not on this
    machine, and says so in the returned source.
    """
    for candidate in (Path(model) / "transformer" / "config.json", Path(model) / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()), str(candidate)
    if not str(model).startswith((".", "/", "~")):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(str(model), "transformer/config.json", local_files_only=True)
            return json.loads(Path(path).read_text()), f"{model} (HF cache)"
        except Exception:  # not cached: the architecture defaults below are the documented fallback
            pass
    return dict(FLUX_DEV_OVERRIDES), f"FLUX.1-dev architecture ({model} is not on this machine)"


def count_parameters(config: dict[str, Any]) -> tuple[int, int, FluxShape]:
    """(parameters, largest layer's parameters, widths) of the transformer built on the meta device."""
    import torch

    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = UltraFluxTransformer2DModel(**kwargs)
    except TypeError as err:
        raise UltraFluxError(f"the transformer config does not fit UltraFluxTransformer2DModel: {err}") from err
    params = sum(p.numel() for p in model.parameters())
    # DeepSpeed's notion of a layer: one module's own parameters (what ZeRO-3 gathers at once)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    cfg = model.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    shape = FluxShape(
        dim=dim,
        heads=cfg.num_attention_heads,
        head_dim=cfg.attention_head_dim,
        mlp_dim=int(dim * 4.0),
        in_channels=cfg.in_channels,
        joint_dim=cfg.joint_attention_dim,
        pooled_dim=cfg.pooled_projection_dim,
        double_blocks=cfg.num_layers,
        single_blocks=cfg.num_single_layers,
    )
    return params, largest, shape


BASE_BYTES = {"bf16": 2.0, "fp32": 4.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}  # nf4: 4 bits + an fp32 scale per 64
PRESET_GPUS_GB = (24.0, 48.0, 80.0)  # the one-GPU sizes the plan reports a fit for


@dataclass(frozen=True)
class LoraCount:
    """Parameters of the LoRA run: the adapters and the frozen base, split as quantization sees it."""

    adapter: int  # trainable
    largest_adapter: int  # one module's adapter parameters (A + B)
    base_linear: int  # weights of the base's adapted-or-not linear layers (what fp8/nf4 quantize)
    base_other: int  # biases, norms, embeddings: kept in bf16 by fp8/nf4


def count_lora(config: dict[str, Any], rank: int, targets: list[str]) -> LoraCount:
    """Count adapter and base parameters exactly: the transformer built on the meta device, adapters added."""
    import torch

    from ultraflux_model.lora.adapters import add_lora
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UltraFluxTransformer2DModel(**kwargs)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        total = sum(p.numel() for p in model.parameters())
        add_lora(model, rank=rank, alpha=float(rank), dropout=0.0, targets=targets)
    adapters = [p for p in model.parameters() if p.requires_grad]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for m in model.modules())
    return LoraCount(sum(p.numel() for p in adapters), largest, linear, total - linear)


def base_bytes(count: LoraCount, base_dtype: str) -> float:
    """Bytes of the frozen base: linear weights in ``base_dtype``, everything else in bf16 under fp8/nf4."""
    if base_dtype in ("fp8", "nf4"):
        return count.base_linear * BASE_BYTES[base_dtype] + count.base_other * 2.0
    return (count.base_linear + count.base_other) * BASE_BYTES[base_dtype]


def stage_batch(stage: StageConfig, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, global batch) of a stage. A plan reports a global batch that ``world_size`` ranks cannot
    split evenly (fractional accumulation in the table) instead of refusing it, as training would."""
    del world_size
    return stage.micro_batch, stage.global_batch


def largest_bucket_tokens(family: str) -> tuple[int, tuple[int, int]]:
    """Image tokens of the family's largest bucket and that bucket (width, height)."""
    from ultraflux_model.buckets import family_buckets
    from ultraflux_model.config import TOKEN_PX

    best = max(family_buckets(family), key=lambda b: (b.width // TOKEN_PX) * (b.height // TOKEN_PX))
    return (best.width // TOKEN_PX) * (best.height // TOKEN_PX), (best.width, best.height)


def ds_settings(ds: DeepSpeedConfig) -> tuple[int, str]:
    """(ZeRO stage, precision) the run will use on GPUs: the JSON file's values when one is set."""
    stage, precision = ds.zero_stage, "fp32" if ds.precision == "fp32" else "bf16"
    if ds.config_file is not None and Path(ds.config_file).is_file():
        data = json.loads(Path(ds.config_file).read_text())
        stage = int(data.get("zero_optimization", {}).get("stage", stage))
        if data.get("bf16", {}).get("enabled") is True:
            precision = "bf16"
    return stage, precision


def step_flops(shape: FluxShape, params: int, image_tokens: int, text_tokens: int, checkpointing: bool,
               frozen: bool = False) -> float:
    """Training FLOPs of one sample: 2·P·S per matmul pass (forward, 2× backward, +1 recompute) plus attention.

    ``frozen`` (LoRA): the base's weight gradients are never computed, so backward is one pass, not two."""
    s = image_tokens + text_tokens
    passes = (4 if checkpointing else 3) - (1 if frozen else 0)
    attention = 4 * s * s * shape.dim * (shape.double_blocks + shape.single_blocks)
    return passes * (2 * params * s + attention)


@dataclass(frozen=True)
class StagePlan:
    name: str
    micro_batch: int
    global_batch: int
    grad_accum: float
    steps: int
    activations_gb: float
    total_gb: float
    fits: bool
    headroom: float  # share of the GPU's memory left free (negative: over by that much)
    step_s: float
    hours: float
    stage1_draws_in_band: float  # share of stage 1's timestep draws that fall in this stage's band


def plan_run(
    train: TrainConfig, *, bucket_family: str, text_tokens: int, gpus: int, gpu_memory_gb: float, nodes: int = 1,
    reserve_gb: float = 3.0, mfu: float = 0.4, peak_tflops: float = H200_BF16_DENSE_TFLOPS,
) -> dict[str, Any]:
    """Everything ``ultraflux plan`` prints, as plain data (the ``--json`` output).

    ``bucket_family`` and ``text_tokens`` are the data the run trains on (``data.buckets.family``,
    ``data.cache.max_sequence_length``): activations are sized at the family's largest bucket.
    """
    from ultraflux_model.training.curriculum import stage_band
    from ultraflux_model.training.timesteps import band_share

    if gpus < 1 or nodes < 1:
        raise UltraFluxError(f"--gpus and --nodes must be ≥ 1 (got {gpus}, {nodes})")
    world = gpus * nodes
    config, source = transformer_config(train.model)
    params, largest, shape = count_parameters(config)
    zero_stage, precision = ds_settings(train.deepspeed)
    b = 2 if precision == "bf16" else 4
    image_tokens, bucket = largest_bucket_tokens(bucket_family)
    lora: dict[str, Any] | None = None
    if train.method == "lora":
        from ultraflux_model.lora.targets import target_modules

        base_dtype = precision if train.lora.base_dtype == "auto" else train.lora.base_dtype
        count = count_lora(config, train.lora.rank, target_modules(train.lora.targets))
        # the adapters carry every optimizer state; the base is weights only, partitioned under ZeRO-3
        states = model_state_bytes(count.adapter, count.largest_adapter, zero_stage=zero_stage, precision=precision,
                                   gpus=world)
        frozen = base_bytes(count, base_dtype) / (world if zero_stage == 3 else 1)
        if zero_stage == 3 and world > 1:
            frozen += largest * BASE_BYTES.get(base_dtype, 2.0)  # the layer gathered whole for compute
        trained = count.adapter
        lora = {"trainable_params": count.adapter, "base_params": params, "base_dtype": base_dtype,
                "rank": train.lora.rank, "targets": train.lora.targets,
                "adapter_states_gb": states.total / GB, "frozen_base_gb": frozen / GB}
    else:
        states = model_state_bytes(params, largest, zero_stage=zero_stage, precision=precision, gpus=world)
        frozen, trained = 0.0, params
    ema = 4 * trained / world if train.ema.enabled else 0.0
    fixed = states.total + frozen + ema + reserve_gb * GB
    ckpt = train.gradient_checkpointing
    one = activation_bytes(shape, image_tokens, text_tokens, micro_batch=1, b=b, checkpointing=ckpt)
    max_micro = max(0, int((gpu_memory_gb * GB - fixed) // one.peak))
    law = train.timesteps
    first = stage_band(train.stages[0], law)
    stages = []
    for st in train.stages:
        micro, glob = stage_batch(st, world)
        act: Activations = activation_bytes(
            shape, image_tokens, text_tokens, micro_batch=micro, b=b, checkpointing=ckpt
        )
        total = fixed + act.peak
        flops = step_flops(shape, params, image_tokens, text_tokens, ckpt, frozen=lora is not None)
        step_s = glob * flops / (world * peak_tflops * 1e12 * mfu)
        stages.append(StagePlan(
            name=st.name, micro_batch=micro, global_batch=glob, grad_accum=glob / (micro * world), steps=st.steps,
            activations_gb=act.peak / GB, total_gb=total / GB, fits=total <= gpu_memory_gb * GB,
            headroom=1.0 - total / (gpu_memory_gb * GB),
            step_s=step_s, hours=step_s * st.steps / 3600,
            stage1_draws_in_band=band_share(law, first, stage_band(st, law)),
        ))
    by_stage = {
        z: (model_state_bytes(params, largest, zero_stage=z, precision=precision, gpus=world).total + ema) / GB
        for z in (0, 1, 2, 3)
    } if lora is None else {}
    head = stages[0]
    peak_total = max(s.total_gb for s in stages)
    warnings = plan_warnings(stages, world, max_micro)
    return {
        "method": train.method,
        "lora": lora,
        # a GPU of each size: the largest stage's per-GPU total fits, is tight (< 10 % free) or does not
        "gpu_fit": {f"{g:g}": _fit(peak_total, g) for g in PRESET_GPUS_GB},
        "params": params,
        "largest_layer_params": largest,
        "architecture": source,
        "gpus": gpus, "nodes": nodes, "world_size": world, "gpu_memory_gb": gpu_memory_gb,
        "zero_stage": zero_stage, "precision": precision, "gradient_checkpointing": ckpt,
        "tokens": {"image": image_tokens, "text": text_tokens, "bucket": list(bucket)},
        "per_gpu": {
            "model_states_excl_ema_gb": states.total / GB,
            "model_states": {k: v / GB for k, v in asdict(states).items()},
            "ema_gb": ema / GB,
            "reserve_gb": reserve_gb,
            "activations_gb": head.activations_gb,
            "activations_per_sample_gb": {"held": one.held / GB, "recompute": one.recompute / GB},
            "total_gb": head.total_gb,
        },
        "model_states_incl_ema_by_zero_stage_gb": by_stage,
        "fits": all(s.fits for s in stages),
        # estimates (activations, fragmentation) are not exact: less than this much free memory is marked "tight"
        "tight_below_headroom": TIGHT_HEADROOM,
        "tight": any(s.fits and s.headroom < TIGHT_HEADROOM for s in stages),
        "max_micro_batch": max_micro,
        "stages": [asdict(s) for s in stages],
        "time": {"mfu": mfu, "peak_tflops": peak_tflops, "hours": sum(s.hours for s in stages)},
        "warnings": warnings,
    }


def plan_warnings(stages: list[StagePlan], world: int, max_micro: int) -> list[str]:
    """What makes no sense in the planned run, one line each: a global batch that the ranks cannot split into whole
    micro-batches (accumulation below 1, or fractional: training refuses both), and a largest fitting micro-batch
    far beyond what any stage feeds one rank (memory is not what bounds this run: the model is small for these
    GPUs)."""
    out = []
    for s in stages:
        per_round = s.micro_batch * world
        if s.grad_accum < 1:
            out.append(f"stage {s.name}: global_batch {s.global_batch} is smaller than micro_batch {s.micro_batch} × "
                       f"{world} GPUs = {per_round} (accumulation {s.grad_accum:.2f} < 1): every GPU needs a whole "
                       f"micro-batch per step; set global_batch to a multiple of {per_round} or plan fewer GPUs")
        elif s.global_batch % per_round:
            out.append(f"stage {s.name}: global_batch {s.global_batch} is not a multiple of micro_batch "
                       f"{s.micro_batch} × {world} GPUs = {per_round} (accumulation {s.grad_accum:.2f}); training "
                       "refuses it")
    fed = max(max(1, s.global_batch // world) for s in stages)
    if max_micro > 8 * fed:
        out.append(f"a micro-batch of {max_micro:,} would fit, but no stage gives one GPU more than {fed} sample(s) "
                   "per step: memory does not bound this run (the model is small for these GPUs), its batch sizes do")
    return out


TIGHT_HEADROOM = 0.10


def _fit(total_gb: float, gpu_gb: float) -> str:
    if total_gb > gpu_gb:
        return "NO"
    return "tight" if 1.0 - total_gb / gpu_gb < TIGHT_HEADROOM else "yes"


def _fit_word(stage: dict[str, Any], plan: dict[str, Any]) -> str:
    if not stage["fits"]:
        return "NO"
    return "tight" if stage["headroom"] < plan["tight_below_headroom"] else "yes"


def format_plan(plan: dict[str, Any]) -> str:
    """The human-readable table ``ultraflux plan`` prints."""
    pg = plan["per_gpu"]
    ms = pg["model_states"]
    tok = plan["tokens"]
    lora = plan.get("lora")
    lines = [
        f"transformer: {plan['params']:,} parameters (largest layer {plan['largest_layer_params']:,}); "
        f"from {plan['architecture']}",
        *([f"LoRA rank {lora['rank']} on {lora['targets']}: {lora['trainable_params']:,} trainable parameters "
           f"({lora['trainable_params'] / lora['base_params']:.2%}); frozen base in {lora['base_dtype']}"]
          if lora else []),
        f"run: {plan['world_size']} GPUs ({plan['nodes']} node(s) × {plan['gpus']}), "
        f"{plan['gpu_memory_gb']:g} GB each, "
        f"ZeRO-{plan['zero_stage']}, {plan['precision']}, gradient checkpointing "
        f"{'on' if plan['gradient_checkpointing'] else 'off'}",
        f"largest bucket: {tok['bucket'][0]}×{tok['bucket'][1]} = {tok['image']:,} image + {tok['text']} text tokens",
        "",
        "per GPU (GB)",
        f"  {'adapter ' if lora else ''}params {ms['params']:.2f} + grads {ms['grads']:.2f} + master "
        f"{ms['master']:.2f} + optimizer {ms['optimizer']:.2f} + gathered layer {ms['gathered']:.2f} = "
        f"{'adapter states' if lora else 'model states (without EMA)'} {pg['model_states_excl_ema_gb']:.2f}",
        *([f"  frozen base ({lora['base_dtype']}) {lora['frozen_base_gb']:.2f}"] if lora else []),
        f"  EMA {pg['ema_gb']:.2f}, reserve (CUDA context, NCCL, fragmentation) {pg['reserve_gb']:.2f}",
        f"  activations per sample: held {pg['activations_per_sample_gb']['held']:.2f} + recompute "
        f"{pg['activations_per_sample_gb']['recompute']:.2f}",
        *(["  model states + EMA by ZeRO stage: "
           + ", ".join(f"{z}: {v:.1f}" for z, v in plan["model_states_incl_ema_by_zero_stage_gb"].items())]
          if plan["model_states_incl_ema_by_zero_stage_gb"] else []),
        "",
        f"{'stage':<10}{'micro':>6}{'global':>8}{'accum':>7}{'act GB':>8}{'total GB':>10}{'free':>6}{'fits':>7}"
        f"{'step s':>8}{'hours':>8}{'stage-1 draws in band':>23}",
    ]
    for s in plan["stages"]:
        lines.append(
            f"{s['name']:<10}{s['micro_batch']:>6}{s['global_batch']:>8}{s['grad_accum']:>7.2f}"
            f"{s['activations_gb']:>8.2f}{s['total_gb']:>10.2f}{s['headroom']:>6.0%}{_fit_word(s, plan):>7}"
            f"{s['step_s']:>8.2f}{s['hours']:>8.1f}{s['stage1_draws_in_band']:>22.1%}"
        )
    lines += [
        "",
        f"fits: {'yes' if plan['fits'] else 'NO'}"
        + (f" (tight: under {plan['tight_below_headroom']:.0%} of GPU memory free in a stage)" if plan["tight"] else "")
        + f"; largest micro-batch that fits: {plan['max_micro_batch']}",
        f"time at {plan['time']['mfu']:.0%} MFU of {plan['time']['peak_tflops']:g} TFLOP/s: "
        f"{plan['time']['hours']:.1f} h in all",
    ]
    if plan["world_size"] == 1:  # which one-GPU size the run fits (the LoRA presets' question)
        lines.append("one GPU of " + ", ".join(f"{g} GB: {w}" for g, w in plan["gpu_fit"].items())
                     + " (the largest stage's total)")
    lines += [f"warning: {w}" for w in plan.get("warnings", [])]
    return "\n".join(lines)
