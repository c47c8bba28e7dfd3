"""The config sections the model package owns: generation, kernels, the loss, training, VAE post-training,
serving limits, the Ray Serve server and the web app.

Every section is frozen and rejects unknown keys (``ultraflux_core.config.Section``), so a typo in a YAML file or
a ``--set`` override fails loudly. The root tree that ``params.yaml`` serialises is assembled above the packages
(``ultraflux.config``); this module imports no other package of ours but the ground floor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from ultraflux_core.config import Section
from ultraflux_core.errors import UltraFluxError

Dtype = Literal["bf16", "fp16", "fp32"]
# What generation takes: a dtype, or auto = bf16 on a GPU and fp32 on a CPU (ultraflux_model.dtypes.resolve_dtype).
GenerateDtype = Literal["auto", "bf16", "fp16", "fp32"]
Offload = Literal["none", "model", "sequential"]
VaeDecodeMode = Literal["tiled", "full", "official"]
KernelChoice = Literal["auto", "eager", "triton"]
# How a run of several prompts seeds its images: per_prompt gives image k the seed `seed + k` (`ultraflux generate`);
# fixed gives every image `seed` (the official inference and Diffusion-4K's evaluation: seed 0 for every prompt).
# The evaluation's `eval.benchmark.seed_policy` names the same two choices (the eval package cannot import this one).
SeedPolicy = Literal["per_prompt", "fixed"]
TrainMethod = Literal["full", "lora"]
LoraTargetPreset = Literal["attention", "attention_mlp", "all_linear"]  # resolved in ultraflux_model.lora.targets
LoraBaseDtype = Literal["auto", "bf16", "fp32", "fp8", "nf4"]

TOKEN_PX = 32  # 16x VAE downsampling then 2x2 packing: one transformer token covers 32x32 pixels
# Request bounds every entry point enforces (``ultraflux_model.inference.limits.check_settings``); docs/app.md.
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's signed 64-bit range, and what JSON clients can send exactly
MAX_GUIDANCE = 30.0  # distilled guidance: the official default is 4.0, Flux-dev's useful range ends well below 30
# The largest bucket of the 4K family (6144×2752 = 16,908,288 px, pinned against ultraflux_model/buckets.py by a test).
MAX_4K_BUCKET_PIXELS = 16_908_288
MAX_T5_TOKENS = 512  # the T5 context UltraFlux was trained with; longer prompts are cut (with a notice)
MAX_LORA_SCALE = 4.0  # |scale| of one LoRA adapter; 1 is the adapter as trained, negative scales invert it


class KernelConfig(Section):
    """Which implementation the hot ops use.

    ``auto``: Triton on CUDA tensors, the pure-torch reference elsewhere. ``triton`` forces the kernel
    (on CPU it then needs ``TRITON_INTERPRET=1``); ``eager`` forces the reference.
    """

    rope: KernelChoice = "auto"
    loss: KernelChoice = "auto"


class LossConfig(Section):
    """SNR-aware Huber wavelet loss (docs/design.md §3). γ, α, β are not published: these defaults are ours."""

    gamma: float = Field(5.0, gt=0.0, description="SNR cap γ in min(SNR, γ)")
    alpha: float = Field(0.5, ge=0.0, description="exponent of the Huber scale schedule c(t)")
    beta: float = Field(0.5, ge=0.0, description="exponent of the SNR weight ω(t)")
    c_min: float = Field(0.2, gt=0.0, description="pseudo-Huber scale at high noise")
    c_max: float = Field(1.0, gt=0.0, validate_default=True, description="pseudo-Huber scale at SNR ≥ γ")
    t_clamp: float = Field(1e-3, gt=0.0, lt=0.5, description="t is clamped to [t_clamp, 1 - t_clamp]")
    band_weights: tuple[float, float, float, float] = Field(
        (1.0, 1.0, 1.0, 1.0),
        description="weights of the Haar sub-bands (LL, LH, HL, HH = pywt's cA, cH, cV, cD) in the loss; "
        "positive, finite; all 1 is the paper's loss (docs/training.md, 'What the wavelet term does')",
    )

    @field_validator("band_weights")
    @classmethod
    def _band_weights_positive(cls, weights: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"band_weights must be 4 positive finite numbers (LL, LH, HL, HH), got {weights}")
        return weights

    @field_validator("c_max")
    @classmethod
    def _c_range_is_ordered(cls, c_max: float, info: Any) -> float:
        c_min = info.data.get("c_min")
        if c_min is not None and c_min > c_max:
            raise ValueError(f"c_min ({c_min}) must not exceed c_max ({c_max}); lower c_min or raise c_max")
        return c_max


CacheMode = Literal["none", "first_block", "taylorseer"]
TaylorSeerPredict = Literal["attention", "output"]
CompileMode = Literal["none", "regional"]
QuantizeMode = Literal["none", "fp8"]
ParallelMode = Literal["none", "context"]
ParallelAttention = Literal["ulysses", "ring"]


class AccelConfig(Section):
    """Accelerators of the denoiser, all diffusers' or torch's own (docs/inference.md "Accelerators"); every one
    is off by default, which is today's exact sampling."""

    cache: CacheMode = Field(
        "none", description="reuse block outputs across steps: first_block (diffusers' FirstBlockCache) or "
        "taylorseer (diffusers' TaylorSeer cache); none runs every block at every step",
    )
    cache_threshold: float = Field(
        0.05, ge=0.0, allow_inf_nan=False,
        description="first_block: skip the other blocks while the first block's residual changes by less than this "
        "(relative mean absolute difference); 0 never skips",
    )
    taylorseer_interval: int = Field(
        5, ge=1, description="taylorseer: one computed step, then interval-1 predicted ones (1: every step computed)"
    )
    taylorseer_warmup: int = Field(3, ge=0, description="taylorseer: steps computed in full before predicting")
    taylorseer_order: int = Field(1, ge=1, le=4, description="taylorseer: order of the Taylor expansion")
    taylorseer_predict: TaylorSeerPredict = Field(
        "attention", description="taylorseer: predict each block's attention (blocks still run their MLPs) or the "
        "model's output (every block skipped on predicted steps: diffusers' lite mode)",
    )
    compile: CompileMode = Field(
        "none", description="regional: torch.compile each repeated transformer block (compiled once per shape)"
    )
    quantize: QuantizeMode = Field(
        "none", description="fp8: torchao float8 weight-only transformer Linears (CUDA, compute capability 8.9+)"
    )
    parallel: ParallelMode = Field(
        "none", description="context: one image's tokens split over the ranks of a torchrun launch (diffusers' "
        "ContextParallelConfig)",
    )
    parallel_attention: ParallelAttention = Field(
        "ulysses", description="context parallel attention: ulysses (all-to-all over heads; CPU or GPU) or ring "
        "(needs a GPU attention backend that returns the log-sum-exp)",
    )


class GenerateConfig(Section):
    """Text-to-image generation (defaults follow the official UltraFlux inference)."""

    model: str = Field("artifacts/tiny-ultraflux", description="checkpoint directory, hub id or models:/NAME@ALIAS")
    prompts: tuple[str, ...] = ("a red fox in fresh snow, golden hour, 4k photograph",)
    sizes: tuple[tuple[int, int], ...] = Field(
        ((4096, 4096),), description="(width, height) pairs; each side a multiple of 32"
    )
    steps: int = Field(50, ge=1, description="sampling steps (at most serve.max_steps)")
    guidance: float = Field(
        4.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="distilled guidance (guidance embedding)"
    )
    shift: float = Field(3.0, gt=0.0, allow_inf_nan=False, description="static FlowMatch Euler timestep shift")
    max_sequence_length: int = Field(MAX_T5_TOKENS, ge=1, le=MAX_T5_TOKENS, description="T5 tokens")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="image k uses seed + k (0 … 2**63-1)")
    dtype: GenerateDtype = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on a CPU (where bf16 is slower and lossier)"
    )
    offload: Offload = "none"
    vae_decode: VaeDecodeMode = "tiled"
    out: Path = Field(
        Path("artifacts/generated"),
        description="folder of the images: `ultraflux generate` writes each run into a new subfolder <time>-<id> of "
        "it, or into it directly with --overwrite",
    )
    transformer: str | None = Field(
        None, description="transformer from another source (directory or hub id); None: the checkpoint's own"
    )
    accel: AccelConfig = Field(AccelConfig(), description="caching, compilation, FP8 weights, multi-GPU per image")
    lora: tuple[str, ...] = Field(
        (), description="LoRA adapters as PATH[:SCALE] (an adapter folder, scale 1 by default, |scale| at most 4); "
        "each must have been trained on this model's transformer (docs/lora.md)"
    )
    fuse_lora: bool = Field(
        False, description="merge the adapters into the transformer's weights before sampling (faster steps); "
        "the base weights are restored bit for bit when the adapters change"
    )

    @field_validator("lora")
    @classmethod
    def _lora_specs_parse(cls, specs: tuple[str, ...]) -> tuple[str, ...]:
        for spec in specs:
            parse_lora_spec(spec)
        return specs

    @field_validator("sizes")
    @classmethod
    def _sizes_are_token_multiples(cls, sizes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        for width, height in sizes:
            check_image_size(width, height)
        return sizes


def nearest_valid_size(width: int, height: int, max_pixels: int | None = None) -> tuple[int, int]:
    """The closest (width, height) whose sides are positive multiples of 32; with ``max_pixels``, scaled down at
    the same aspect ratio until it holds at most that many pixels (a suggestion must itself be accepted)."""
    w = max(TOKEN_PX, round(width / TOKEN_PX) * TOKEN_PX)
    h = max(TOKEN_PX, round(height / TOKEN_PX) * TOKEN_PX)
    if max_pixels is None or w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (max(width, 1) * max(height, 1)))
    w = max(TOKEN_PX, math.floor(max(width, 1) * scale / TOKEN_PX) * TOKEN_PX)
    h = max(TOKEN_PX, math.floor(max(height, 1) * scale / TOKEN_PX) * TOKEN_PX)
    while w * h > max_pixels and max(w, h) > TOKEN_PX:  # an extreme aspect ratio where one side sat at 32
        w, h = (w - TOKEN_PX, h) if w >= h else (w, h - TOKEN_PX)
    return w, h


def check_image_size(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise ``UltraFluxError`` naming the nearest valid size (within ``max_pixels``, default the 4K buckets')
    unless both sides are positive multiples of 32."""
    if width <= 0 or height <= 0 or width % TOKEN_PX or height % TOKEN_PX:
        w, h = nearest_valid_size(width, height, MAX_4K_BUCKET_PIXELS if max_pixels is None else max_pixels)
        raise UltraFluxError(
            f"image size {width}x{height} is not supported: width and height must be positive multiples of "
            f"{TOKEN_PX} (16x VAE, 2x2 packing); the nearest valid size is {w}x{h}"
        )


def check_lora_scale(scale: object, what: str = "LoRA scale") -> float:
    """``scale`` as a float when it is a finite number with ``|scale| <= MAX_LORA_SCALE``, else ``UltraFluxError``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise UltraFluxError(f"{what} must be a finite number, got {scale!r}")
    if abs(float(scale)) > MAX_LORA_SCALE:
        raise UltraFluxError(f"{what} must lie between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}")
    return float(scale)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"PATH[:SCALE]"`` → ``(PATH, SCALE)`` (scale 1 when absent). Pure: whether PATH is an adapter is checked
    where it is loaded (``ultraflux_model.lora.apply.read_adapter``).

    The scale is what follows the last ``:`` unless that part holds a ``/`` or ``\\`` (then the whole text is a
    path, e.g. ``C:\\adapters\\style``); a tail that is not a number is refused rather than read as a path.
    """
    text = spec.strip()
    head, colon, tail = text.rpartition(":")
    if not colon or "/" in tail or "\\" in tail:
        path, scale = text, 1.0
    else:
        try:
            value = float(tail)
        except ValueError:
            raise UltraFluxError(
                f"bad LoRA scale {tail!r} in {spec!r}: write PATH or PATH:SCALE with SCALE a number "
                f"between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}"
            ) from None
        path, scale = head, check_lora_scale(value, f"LoRA scale in {spec!r}")
    if not path:
        raise UltraFluxError(f"LoRA adapter {spec!r} names no path: write PATH or PATH:SCALE")
    return path, scale


TimestepSampling = Literal["uniform", "logit_normal"]
BandReading = Literal["sigma_high", "index_low"]
SCHEDULER_STEPS = 1000  # the training scheduler's num_train_timesteps, the scale of a stage's paper_band


class TimestepConfig(Section):
    """How training draws t ∈ [0, 1] (z_t = (1−t)·z + t·ε): a base law, then the static shift."""

    sampling: TimestepSampling = "logit_normal"
    logit_mean: float = Field(0.0, description="mean of the normal behind the logit-normal law")
    logit_std: float = Field(1.0, gt=0.0, description="std of the normal behind the logit-normal law")
    shift: float = Field(1.0, gt=0.0, description="t ← s·t / (1 + (s−1)·t) after sampling (1 = none)")
    band_schedule: Literal["shifted", "unshifted"] = Field(
        "shifted",
        description="a stage's t_min/t_max bound the shifted t (the σ in z_t), or the draw before the shift "
        "(scheduler-index reading); identical when shift is 1 (docs/training.md, timestep law)",
    )
    band_reading: BandReading = Field(
        "sigma_high",
        description="how a stage's paper_band (the paper's 'timesteps 0-459') becomes σ: sigma_high = indices into "
        "the descending sigma schedule (σ = 1 - i/1000, stage 2 σ ≥ 0.541); index_low = timestep values σ·1000 "
        "(stage 2 σ ≤ 0.459); see docs/training.md, paper facts and our readings",
    )


class StageConfig(Section):
    """One Stage-wise Aesthetic Curriculum stage (docs/design.md §3 SACL)."""

    name: str = Field("stage1", pattern=r"^[A-Za-z0-9_.-]+$", description="folder name of the stage's outputs")
    subset: Literal["all", "stage2"] = Field(
        "all", description="cache subset: everything, or the stage-2 members (top data.filter.stage2_top by aesthetics)"
    )
    t_min: float = Field(0.0, ge=0.0, lt=1.0, description="lower end of the timestep band")
    t_max: float = Field(1.0, gt=0.0, le=1.0, description="upper end of the timestep band")
    paper_band: tuple[int, int] | None = Field(
        None,
        description="the band as the paper writes it, scheduler timesteps of 1000 (stage 2: [0, 459]); turned into "
        "σ by train.timesteps.band_reading; None: t_min/t_max as given (which must stay 0/1 when this is set)",
    )
    steps: int = Field(8, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0.0)
    micro_batch: int = Field(2, ge=1, description="samples per rank per forward/backward")
    global_batch: int = Field(
        2, ge=1, validate_default=True,
        description="samples per optimizer step over all ranks (paper 64); accumulation = global / (micro × ranks)",
    )
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up")

    @field_validator("t_max")
    @classmethod
    def _band_is_ordered(cls, t_max: float, info: Any) -> float:
        t_min = info.data.get("t_min")
        if t_min is not None and t_min >= t_max:
            raise ValueError(f"t_min ({t_min}) must be below t_max ({t_max})")
        return t_max

    @field_validator("paper_band")
    @classmethod
    def _paper_band_alone(cls, band: tuple[int, int] | None, info: Any) -> tuple[int, int] | None:
        if band is None:
            return band
        lo, hi = band
        if not 0 <= lo < hi <= SCHEDULER_STEPS:
            raise ValueError(
                f"paper_band {list(band)} must be [first, last] with 0 <= first < last <= {SCHEDULER_STEPS}"
            )
        if (info.data.get("t_min"), info.data.get("t_max")) != (0.0, 1.0):
            raise ValueError("set either paper_band or t_min/t_max, not both (paper_band derives the band)")
        return band

    @model_validator(mode="before")
    @classmethod
    def _old_batch_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and {"batch_size", "grad_accum"} & set(data):
            raise ValueError(
                "batch_size and grad_accum were replaced: set micro_batch (per rank, the old batch_size) and "
                "global_batch (samples per optimizer step over all ranks = old batch_size x grad_accum x ranks)"
            )
        return data

    @field_validator("global_batch")
    @classmethod
    def _global_batch_holds_micro_batches(cls, global_batch: int, info: Any) -> int:
        micro = info.data.get("micro_batch")
        if micro is not None and global_batch % micro:
            raise ValueError(f"global_batch ({global_batch}) must be a multiple of micro_batch ({micro})")
        return global_batch

    def grad_accum(self, world_size: int) -> int:
        """Micro batches per rank per optimizer step: global_batch / (micro_batch × world_size), exactly."""
        per_round = self.micro_batch * world_size
        if self.global_batch % per_round:
            rounds = self.global_batch // self.micro_batch
            fits = [n for n in range(1, rounds + 1) if rounds % n == 0]
            raise UltraFluxError(
                f"stage {self.name}: global_batch {self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch} x {world_size} ranks = {per_round}; set train.stages.{self.name}.global_batch "
                f"to a multiple of {per_round}, change micro_batch, or launch one of {fits} ranks"
            )
        return self.global_batch // per_round


class DeepSpeedConfig(Section):
    """DeepSpeed engine settings; the JSON config is generated from these unless ``config_file`` is set."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    config_file: Path | None = Field(
        None, description="DeepSpeed JSON (e.g. infra/deepspeed/zero3_gpu_bf16.json); batch keys may be 'auto'"
    )
    gradient_clipping: float = Field(1.0, ge=0.0, description="0 disables clipping")
    torch_extensions_dir: Path = Field(
        Path("~/.cache/ultraflux/torch_extensions"), description="fixed build cache for DeepSpeed's C++ ops"
    )
    cpu_shm_comm_op: bool = Field(
        False, description="build DeepSpeed's shared-memory comm op on CPU (only speeds up inference all-reduce)"
    )


class CheckpointConfig(Section):
    """Resumable checkpoints (DeepSpeed state + trainer state) and the consolidated export."""

    every: int = Field(10, ge=1, description="save every N optimizer steps (and always at the end of a stage)")
    keep_last: int = Field(2, ge=1, description="older step checkpoints are deleted")


class EmaConfig(Section):
    """Exponential moving average of the weights (kept per rank on its ZeRO partition)."""

    enabled: bool = True
    decay: float = Field(0.999, ge=0.0, lt=1.0)


class LoraConfig(Section):
    """LoRA adapters on the transformer (``train.method: lora``; docs/training.md "LoRA")."""

    rank: int = Field(16, ge=1, description="r: the adapters' inner width")
    alpha: float = Field(16.0, gt=0.0, description="an adapted layer adds (alpha / rank)·B·A·x")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    targets: LoraTargetPreset = Field(
        "attention", description="attention: the q/k/v/out projections; attention_mlp: + the MLPs and the single "
        "blocks' fused output; all_linear: every linear layer (AdaLN, embedders too)"
    )
    base_dtype: LoraBaseDtype = Field(
        "auto", description="the frozen base's weights: auto = the training precision (bf16 on CUDA, fp32 on CPU), "
        "bf16/fp32 (must equal train.deepspeed.precision), fp8 (torchao, CUDA) or nf4 (bitsandbytes, CUDA); "
        "fp8/nf4 need ZeRO stage 0-2"
    )


class TrainConfig(Section):
    """DiT training with the Stage-wise Aesthetic Curriculum (paper values in configs/4k.yaml)."""

    model: str = Field("artifacts/tiny-ultraflux", description="base checkpoint (its transformer/ is trained)")
    method: TrainMethod = Field(
        "full", description="full: train every transformer weight; lora: freeze the base, train LoRA adapters "
        "(train.lora), export adapter folders"
    )
    lora: LoraConfig = LoraConfig()
    cache_dir: Path = Field(Path("artifacts/data/cache"), description="latent + text-embedding cache")
    run_dir: Path = Field(Path("artifacts/train"), description="checkpoints, exports and metrics go here")
    stages: tuple[StageConfig, ...] = (
        StageConfig(name="stage1", steps=40, lr=1e-3),
        StageConfig(
            name="stage2", subset="stage2", paper_band=(0, 459), steps=10, lr=5e-4, micro_batch=1, global_batch=2
        ),
    )
    timesteps: TimestepConfig = TimestepConfig()
    loss: LossConfig = LossConfig()
    guidance: float = Field(3.5, ge=0.0, description="guidance-embedding value fed while training (Flux-dev recipe)")
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    gradient_checkpointing: bool = True
    seed: int = 0
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    ema: EmaConfig = EmaConfig()
    log_every: int = Field(1, ge=1, description="optimizer steps per logged metrics row")
    sample_every: int = Field(0, ge=0, description="export + sample grids every N steps (0: only at stage end)")
    sample_prompts: tuple[str, ...] = ("a red fox in fresh snow", "a lighthouse at dusk")
    sample_sizes: tuple[tuple[int, int], ...] = Field(
        ((64, 64), (96, 64)), description="(width, height) per aspect ratio of the sample grids; () disables them"
    )
    sample_steps: int = Field(4, ge=1)

    @field_validator("stages")
    @classmethod
    def _stage_names_unique(cls, stages: tuple[StageConfig, ...]) -> tuple[StageConfig, ...]:
        if not stages:
            raise ValueError("at least one stage is needed")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages

    @field_validator("sample_sizes")
    @classmethod
    def _sample_sizes_valid(cls, sizes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        for width, height in sizes:
            check_image_size(width, height)
        return sizes


class VaeTrainConfig(Section):
    """F16 VAE decoder post-training (encoder frozen; docs/design.md §3)."""

    model: str = Field(
        "artifacts/tiny-ultraflux",
        description="starting VAE: a diffusers AutoencoderKL folder (config.json + safetensors) with stride 2, a "
        "checkpoint holding one in vae/ (e.g. Owen777/UltraFlux-v1), a hub id of either, or models:/NAME@ALIAS",
    )
    images: Path = Field(Path("artifacts/data/ingest/images"), description="folder of training images (recursive, "
                         "each file once) or the filter's vae subset (<root>/subsets/vae.parquet)")
    heldout_manifest: Path | None = Field(
        None,
        description="fixed held-out images, JSON {images: [{path, sha256}]} (paths relative to the file or "
        "absolute), never trained on (overlap with `images` is refused); None: `heldout` images drawn by `seed` "
        "from `images`, written to <out>/heldout.json",
    )
    out: Path = Field(Path("artifacts/vae-post"), description="exported vae/ and the before/after report")
    crop: int = Field(64, ge=32, description="square crop side (paper 512); a multiple of 32")
    least_flat: float = Field(0.5, gt=0.0, le=1.0, description="train on this least-flat share of the images")
    heldout: int = Field(4, ge=2, description="images drawn for the before/after report when no heldout_manifest")
    steps: int = Field(30, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    w_l2: float = Field(1.0, ge=0.0)
    w_wavelet: float = Field(0.2, ge=0.0, description="L1 on the high-frequency Haar sub-bands")
    w_lpips: float = Field(0.1, ge=0.0)
    lpips_alexnet: Path | None = Field(
        None, description="torchvision AlexNet state dict (safetensors) for the LPIPS trunk; None: seeded random (CI)"
    )
    backbones: str = Field("tiny", description="rFID features: 'tiny' (seeded random) or an ultraflux-eval weights dir")
    flat_patch: int = Field(64, ge=8, description="flatness patch side used to rank images (official 240)")
    seed: int = 0
    device: str = "cpu"

    @field_validator("crop")
    @classmethod
    def _crop_is_token_multiple(cls, crop: int) -> int:
        check_image_size(crop, crop)
        return crop


class ServeConfig(Section):
    """Ceilings every serving front-end enforces (web app, served pyfunc model) so one request cannot exhaust
    the machine; checked by ``ultraflux_model.inference.limits.check_request``."""

    max_pixels: int = Field(MAX_4K_BUCKET_PIXELS, ge=1024, description="pixels per image (default: the 4K buckets)")
    max_images: int = Field(4, ge=1, description="images per request")
    max_steps: int = Field(
        200, ge=1, description="sampling steps per image (the official default is 50; cost grows linearly)"
    )


class RayServeConfig(Section):
    """``ultraflux serve``: the generation server on Ray Serve (``ultraflux_model.serving.ray_app``; docs/deploy.md).

    Request defaults come from ``generate``, ceilings from ``serve`` (the one request guard), as for the served pyfunc
    model. Each replica loads ``model`` once and generates one request at a time by default."""

    model: str = Field("artifacts/tiny-ultraflux", description="checkpoint directory, hub id or models:/NAME@ALIAS")
    address: str | None = Field(
        None, description="Ray cluster to deploy on (host:port of its GCS, or 'auto'); None: start a local Ray"
    )
    host: str = Field("127.0.0.1", description="HTTP bind address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy")
    replicas: int = Field(1, ge=1, description="generator replicas (the lower bound when max_replicas is set)")
    max_replicas: int | None = Field(
        None, ge=1, description="None: a fixed number of replicas; set: autoscale between replicas and max_replicas"
    )
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (1 on GPU nodes; 0 runs on CPU)")
    lora: tuple[str, ...] = Field(
        (), description="LoRA adapter folders every replica loads, each trained on model; a request names one by its "
        "folder name (column lora), never by path"
    )
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    max_ongoing_requests: int = Field(1, ge=1, description="requests one replica generates at once (one per GPU)")
    max_queued_requests: int = Field(
        # at least 1: Ray Serve counts a request as queued until a replica takes it, so 0 would refuse every request
        8, ge=1, description="requests waiting for a free replica; more are refused with HTTP 429"
    )
    job_ttl_s: float = Field(3600.0, gt=0.0, description="how long a finished job's status and result are kept")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> RayServeConfig:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least replicas ({self.replicas})")
        return self


class UiConfig(Section):
    """``ultraflux ui``: the web app (UltraFlux Studio)."""

    model: str = Field("artifacts/tiny-ultraflux", description="checkpoint directory, hub id or models:/NAME@ALIAS")
    compare: str | None = Field(None, description="second model shown side by side (same prompt and seed)")
    transformer: str | None = Field(None, description="transformer from another source for --model")
    lora: tuple[str, ...] = Field(
        (), description="LoRA adapter folders the page's LoRA picker offers (by folder name, with a scale slider), "
        "each trained on --model; clients pick by name, never by path"
    )
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = Field(7860, ge=0, le=65535, description="0 picks a free port")
    out: Path = Path("artifacts/studio")
    share: bool = Field(False, description="create a public gradio.live link (off unless asked)")
    steps: int = Field(28, ge=1, description="default sampling steps in the form")
    queue_size: int = Field(16, ge=1, description="jobs waiting or running for all users; more are refused")
    session_jobs: int = Field(1, ge=1, description="jobs one browser session (or API client) may have queued at once")
