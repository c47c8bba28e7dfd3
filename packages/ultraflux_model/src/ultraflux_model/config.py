"""The config sections the model package owns: generation, kernels, the loss, training, VAE post-training,
serving limits and the web app.

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

TOKEN_PX = 32  # 16x VAE downsampling then 2x2 packing: one transformer token covers 32x32 pixels
# Request bounds every entry point enforces (``ultraflux_model.inference.limits.check_settings``); docs/app.md.
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's signed 64-bit range, and what JSON clients can send exactly
MAX_GUIDANCE = 30.0  # distilled guidance: the official default is 4.0, Flux-dev's useful range ends well below 30
# The largest bucket of the 4K family (6144×2752 = 16,908,288 px, pinned against ultraflux_model/buckets.py by a test).
MAX_4K_BUCKET_PIXELS = 16_908_288
MAX_T5_TOKENS = 512  # the T5 context UltraFlux was trained with; longer prompts are cut (with a notice)


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


class TrainConfig(Section):
    """DiT training with the Stage-wise Aesthetic Curriculum (paper values in configs/4k.yaml)."""

    model: str = Field("artifacts/tiny-ultraflux", description="base checkpoint (its transformer/ is trained)")
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


class UiConfig(Section):
    """``ultraflux ui``: the web app (UltraFlux Studio)."""

    model: str = Field("artifacts/tiny-ultraflux", description="checkpoint directory, hub id or models:/NAME@ALIAS")
    compare: str | None = Field(None, description="second model shown side by side (same prompt and seed)")
    transformer: str | None = Field(None, description="transformer from another source for --model")
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = Field(7860, ge=0, le=65535, description="0 picks a free port")
    out: Path = Path("artifacts/studio")
    share: bool = Field(False, description="create a public gradio.live link (off unless asked)")
    steps: int = Field(28, ge=1, description="default sampling steps in the form")
    queue_size: int = Field(16, ge=1, description="jobs waiting or running for all users; more are refused")
    session_jobs: int = Field(1, ge=1, description="jobs one browser session (or API client) may have queued at once")
