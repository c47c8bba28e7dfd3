"""DiT training with DeepSpeed ZeRO: one Stage-wise Aesthetic Curriculum stage at a time.

Read top to bottom: ``train_stage`` sets up the process group, the cached data of the stage's subset,
the transformer (text encoders and VAE are never loaded: the cache holds their outputs), the DeepSpeed
engine and EMA, resumes from the latest checkpoint when asked, then loops::

    z (cached latents), ε and t (drawn per sample from a seed derived from the step) →
    z_t = (1−t)·z + t·ε → v = DiT(z_t) → x̂₀ = z_t − t·v → SNR-aware Huber wavelet loss(x̂₀, z)

Every random number of a step comes from generators seeded by (seed, stage, step, sample), where sample is
the sample's place in the step's global batch, so the stream of noise does not depend on what ran before or
on how the global batch is split: a resumed run and an uninterrupted one see the same ε and t, and N ranks
with A accumulation rounds see what one process with N·A rounds would (same samples, same noise).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import trange
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.locks import exclusive
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_core.tracking.lineage import dvc_data_hash, git_sha
from ultraflux_core.tracking.runs import Tracker, flatten
from ultraflux_core.tracking.uri import check_tracking_reachable

from ultraflux_model.config import DeepSpeedConfig, GenerateConfig, KernelConfig, LossConfig, StageConfig, TrainConfig
from ultraflux_model.diffusion.latents import image_ids, pack_latents, text_ids, unpack_latents
from ultraflux_model.diffusion.losses import training_loss, x0_from_velocity
from ultraflux_model.training.checkpoint import CheckpointManager, export_transformer, gather_full_tensors
from ultraflux_model.training.curriculum import (
    DONE_MARKER,
    TRANSFORMER_DIR,
    StagePlan,
    find_stage,
    stage_band,
    stage_plans,
    stages_to_run,
)
from ultraflux_model.training.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    quiet_deprecated_collectives,
    sum_across_ranks,
    use_bf16,
)
from ultraflux_model.training.ema import ShardedEma
from ultraflux_model.training.host_memory import peak_rss_bytes
from ultraflux_model.training.timesteps import timesteps_from_uniform


class RunConfig(Protocol):
    """What the trainer reads of the root config tree (``ultraflux.config.UltraFluxConfig`` is one): the training
    section, the kernel choice, where to track, and the generation settings of the sample grids. The whole tree is
    what gets logged (``config.yaml``), so it must dump itself."""

    @property
    def train(self) -> TrainConfig: ...
    @property
    def kernels(self) -> KernelConfig: ...
    @property
    def tracking(self) -> TrackingConfig: ...
    @property
    def generate(self) -> GenerateConfig: ...
    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


T_BANDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # edges of the per-timestep-band loss metrics


@dataclass
class StageResult:
    """What one ``train_stage`` call did (losses of the steps this process ran, rank-averaged)."""

    name: str
    export: Path
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    run_id: str | None = None


# ----------------------------------------------------------------------------------------------- pure pieces


def deepspeed_config(ds: DeepSpeedConfig, stage: StageConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a stage: ``ds.config_file`` (with ``"auto"`` batch keys filled) or generated."""
    batch = {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum(world_size),
        "train_batch_size": stage.global_batch,
    }
    bf16 = use_bf16(ds)
    if ds.config_file is not None:
        path = Path(ds.config_file)
        if not path.is_file():
            raise UltraFluxError(f"train.deepspeed.config_file {path} does not exist")
        config = json.loads(path.read_text())
        for key, value in batch.items():
            if config.get(key, "auto") not in ("auto", value):
                raise UltraFluxError(
                    f"{path} sets {key}={config[key]} but the stage needs {value} (micro_batch={stage.micro_batch}, "
                    f"global_batch={stage.global_batch}, ranks={world_size}); set it to \"auto\""
                )
            config[key] = value
        if config.get("gradient_clipping") == "auto":
            config["gradient_clipping"] = ds.gradient_clipping
        for precision in ("bf16", "fp16"):
            if config.get(precision, {}).get("enabled") == "auto":
                config[precision]["enabled"] = bf16 if precision == "bf16" else False
        return config
    return {
        **batch,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": ds.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(),
            "reduce_bucket_size": 5e7,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
        },
        # Torch's AdamW is the client optimizer: no JIT-built fused/cpu_adam ops needed anywhere.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def sample_seed(seed: int, stage: int, step: int, sample: int) -> int:
    """A well-mixed 63-bit seed for one sample of a step's global batch (independent streams per tuple)."""
    return int(np.random.SeedSequence([seed, stage, step, sample]).generate_state(2, np.uint64)[0] >> 1)


def first_sample_of(micro: int, rank: int, world_size: int, micro_batch: int) -> int:
    """Place in the step's global batch of the first sample of accumulation round ``micro`` on ``rank``.

    Round ``micro`` of ``rank`` takes the sampler's global micro batch ``micro·world_size + rank`` of the step
    (``BucketBatchSampler`` deals global batches round-robin over ranks), so this is that batch's offset.
    """
    return (micro * world_size + rank) * micro_batch


def draw_noise_and_t(
    latent_shape: tuple[int, ...], first_sample: int, *, seed: int, stage_index: int, step: int,
    stage: StageConfig, timesteps: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ε ``[B, C, h, w]`` and t ``[B]`` (CPU, fp32) for samples ``first_sample ..`` of the step's global batch."""
    noise, uniform = [], []
    for i in range(latent_shape[0]):
        g = torch.Generator().manual_seed(sample_seed(seed, stage_index, step, first_sample + i))
        uniform.append(torch.rand((), generator=g, dtype=torch.float64))
        noise.append(torch.randn(latent_shape[1:], generator=g))
    t = timesteps_from_uniform(torch.stack(uniform), timesteps, *stage_band(stage, timesteps))
    return torch.stack(noise), t


def predict_x0(model: Callable[..., Any], batch: dict[str, torch.Tensor], noise: torch.Tensor, t: torch.Tensor, *,
               guidance: float | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise the latents, run the DiT, return (x̂₀, z) both ``[B, 16, h, w]`` in fp32.

    ``model`` is the transformer or a DeepSpeed engine around it (called with the same keywords).
    """
    z = batch["latents"].float()
    b, _, h, w = z.shape
    tt = t.to(z.device).float()
    z_t = (1.0 - tt.view(b, 1, 1, 1)) * z + tt.view(b, 1, 1, 1) * noise.to(z.device)
    prompt_embeds = batch["prompt_embeds"].to(dtype)
    v = model(
        hidden_states=pack_latents(z_t).to(dtype),
        encoder_hidden_states=prompt_embeds,
        pooled_projections=batch["pooled"].to(dtype),
        timestep=tt.to(dtype),
        img_ids=image_ids(h // 2, w // 2, device=z.device),
        txt_ids=text_ids(prompt_embeds.shape[1], device=z.device),
        guidance=None if guidance is None else torch.full((b,), guidance, device=z.device, dtype=dtype),
        return_dict=False,
    )[0]
    return x0_from_velocity(z_t, unpack_latents(v.float(), h, w), tt), z


@torch.no_grad()
def per_sample_losses(pred_x0: torch.Tensor, target: torch.Tensor, t: torch.Tensor, cfg: LossConfig,
                      kernel: Any) -> torch.Tensor:
    """``[B]`` loss of each sample alone (for the per-timestep-band metrics)."""
    return torch.stack([training_loss(pred_x0[i : i + 1], target[i : i + 1], t[i : i + 1], cfg=cfg, kernel=kernel)
                        for i in range(t.shape[0])])


def band_name(t: float) -> str:
    for lo, hi in zip(T_BANDS[:-1], T_BANDS[1:], strict=True):
        if t < hi or hi == T_BANDS[-1]:
            return f"loss_t{lo:.2f}-{hi:.2f}"
    raise AssertionError(t)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


# ----------------------------------------------------------------------------------------------- data


class BatchStream:
    """Endless bucketed batches of one rank over a subset of the cache, with a resumable position."""

    def __init__(self, dataset: Any, indices: list[int], batch_size: int, *, seed: int, dist: DistInfo,
                 grad_accum: int = 1) -> None:
        from ultraflux_model.training.sampler import BucketBatchSampler

        keys = dataset.bucket_keys()
        self.dataset, self.indices = dataset, indices
        self.sampler = BucketBatchSampler(
            [keys[i] for i in indices], batch_size, seed=seed, rank=dist.rank, world_size=dist.world_size,
            drop_last=True, step_batches=grad_accum,
        )
        if len(self.sampler) == 0:
            raise UltraFluxError(
                f"the stage's subset has {len(indices)} cached samples, too few for one optimizer step of "
                f"{grad_accum} micro batch(es) of {batch_size} per rank on {dist.world_size} rank(s), each within "
                "one aspect-ratio bucket; lower the stage's micro_batch or global_batch, widen its subset or cache "
                "more data"
            )
        self._iter: Iterator[list[int]] | None = None

    def next(self, device: torch.device) -> dict[str, Any]:
        from ultraflux_model.training.latent_cache import collate_latents

        while True:
            if self._iter is None:
                self._iter = iter(self.sampler)
            try:
                positions = next(self._iter)
                break
            except StopIteration:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._iter = None
        batch = collate_latents([self.dataset[self.indices[p]] for p in positions])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._iter = None


# ----------------------------------------------------------------------------------------------- exports


def write_sample_grids(export_dir: Path, cfg: RunConfig, out_dir: Path, tracker: Tracker, step: int,
                       stage: str, device: torch.device, text_tokens: int, base: Path | None = None) -> list[Path]:
    """Generate every sample prompt at each sample aspect ratio with the export; log one grid per ratio.

    ``text_tokens``: the T5 length the model trains on (the cached embeddings'), so samples see what training saw.
    ``base``: with LoRA the export is an adapter folder, applied to this base checkpoint's transformer.
    """
    from PIL import Image

    from ultraflux_model.inference.pipeline import generate, load_pipeline

    train = cfg.train
    dtype = "bf16" if use_bf16(train.deepspeed) else "fp32"
    # With LoRA the export is an adapter folder: samples run the base with it, the way `generate --lora` does.
    lora = [str(export_dir)] if base is not None else []
    checkpoint = base if base is not None else export_dir
    pipe = load_pipeline(checkpoint, dtype=dtype, device=str(device))
    grids: list[Path] = []
    for width, height in train.sample_sizes:
        images = generate(
            checkpoint, list(train.sample_prompts), [(width, height)], steps=train.sample_steps,
            guidance=cfg.generate.guidance, shift=cfg.generate.shift, seed=train.seed, dtype=dtype,
            max_sequence_length=text_tokens, out_dir=out_dir / f"{width}x{height}",
            pipe=pipe, progress=False, lora=lora,
        )
        grid = Image.new("RGB", (width * len(images), height))
        for i, item in enumerate(images):
            with Image.open(item.path) as im:
                grid.paste(im.convert("RGB"), (i * width, 0))
        path = out_dir / f"grid_{width}x{height}.png"
        grid.save(path)
        tracker.log_image(grid, f"samples/{stage}/step{step:07d}_{width}x{height}.png")
        grids.append(path)
    return grids


# ----------------------------------------------------------------------------------------------- the loop


def lora_base_dtype(train: TrainConfig, ds_config: dict[str, Any], cuda: bool) -> str:
    """The dtype the frozen base is held in (``train.lora.base_dtype`` resolved), refusing what cannot run here.

    bf16/fp32: DeepSpeed holds every weight in the training precision, so the base follows it and another choice is
    refused. fp8 (torchao weight-only) and nf4 (bitsandbytes) replace the base's linear weights with quantized
    tensors: CUDA only, and not under ZeRO-3, which partitions plain tensors only.
    """
    want = train.lora.base_dtype
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    if want == "auto":
        return precision
    if want in ("bf16", "fp32"):
        if want != precision:
            raise UltraFluxError(
                f"train.lora.base_dtype={want} but training runs in {precision} (DeepSpeed holds the base in the "
                f"training precision): set train.deepspeed.precision={want} or train.lora.base_dtype=auto"
            )
        return want
    library = {"fp8": "torchao", "nf4": "bitsandbytes"}[want]
    if not cuda:
        raise UltraFluxError(f"train.lora.base_dtype={want} needs a CUDA GPU ({library}); on CPU use auto")
    import importlib.util

    if importlib.util.find_spec(library) is None:
        raise UltraFluxError(f"train.lora.base_dtype={want} needs {library}, which is not installed: pip install "
                             f"{library}, or use base_dtype auto")
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise UltraFluxError(f"train.lora.base_dtype={want} does not work under ZeRO-3 (it partitions plain tensors "
                             "only): set train.deepspeed.zero_stage to 0, 1 or 2")
    return want


def _quantization_config(base_dtype: str) -> Any:
    """diffusers' loading-time quantization of the frozen base (fp8: torchao weight-only e4m3; nf4: bitsandbytes)."""
    if base_dtype == "fp8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig

        return TorchAoConfig(Float8WeightOnlyConfig())
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def _load_transformer(path: Path, ds_config: dict[str, Any], base_dtype: str = "fp32") -> torch.nn.Module:
    """The transformer to train; under ZeRO-3 built partitioned with its weights streamed into the partitions
    (no rank ever holds the whole model), otherwise loaded whole in fp32 for DeepSpeed to wrap (a LoRA base in
    fp8/nf4: quantized while loading)."""
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    if not (path / "config.json").is_file():
        raise UltraFluxError(
            f"no transformer to start from at {path}: for the first stage set train.model to a checkpoint "
            "(ultraflux init-tiny DIR writes a tiny one); later stages start from the previous stage's export, "
            "so run that stage first"
        )
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from ultraflux_model.training.partitioned import build_partitioned

        return build_partitioned(UltraFluxTransformer2DModel, path, ds_config)
    if base_dtype in ("fp8", "nf4"):
        return UltraFluxTransformer2DModel.from_pretrained(
            path, torch_dtype=torch.bfloat16, quantization_config=_quantization_config(base_dtype))
    return UltraFluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)


def _build_model(train: TrainConfig, plan: StagePlan, base: Path, ds_config: dict[str, Any],
                 device: torch.device) -> torch.nn.Module:
    """The stage's starting model: the previous stage's export (full), or the frozen base with LoRA adapters that
    start from the previous stage's adapter folder (lora; fresh adapters in the first stage)."""
    if train.method == "full":
        return _load_transformer(base / TRANSFORMER_DIR if plan.index == 0 else plan.init_from, ds_config)
    from ultraflux_model.lora.adapters import add_lora, load_adapter_state
    from ultraflux_model.lora.targets import target_modules

    base_dtype = lora_base_dtype(train, ds_config, device.type == "cuda")
    model = _load_transformer(base / TRANSFORMER_DIR, ds_config, base_dtype)
    lora = train.lora
    # Adapters are plain tensors even under ZeRO-3: deepspeed.initialize partitions them with the optimizer.
    add_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=target_modules(lora.targets))
    if plan.init_adapter is not None:
        if not plan.start_marker.is_file():
            raise UltraFluxError(f"stage {plan.stage.name} starts from the adapters in {plan.init_adapter}, which "
                                 "do not exist: run the previous stage first")
        load_adapter_state(model, plan.init_adapter)
    return model


def _tracker_for(cfg: RunConfig, plan: StagePlan, dist: DistInfo, resume: bool) -> Tracker:
    run_dir = Path(cfg.train.run_dir)
    uri = cfg.tracking.resolve_uri(run_dir)
    tracker = Tracker(uri, cfg.tracking.experiment, active=dist.is_main, artifact_dir=run_dir / "mlartifacts")
    id_file = plan.dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if resume and id_file.is_file() and dist.is_main else None
    from ultraflux_model.training.latent_cache import INDEX

    tags = {
        "git_sha": git_sha(Path.cwd()),
        "dvc_data_hash": dvc_data_hash(Path(cfg.train.cache_dir), INDEX),
        "stage": plan.stage.name,
        "run_dir": str(run_dir.resolve()),
    }
    run_id = tracker.start(f"{run_dir.name}/{plan.stage.name}", tags=tags, run_id=previous)
    if dist.is_main and previous is None:
        id_file.write_text(f"{run_id}\n")
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        tracker.log_params({"world_size": str(dist.world_size), "stage_index": str(plan.index)})
        tracker.log_text(dump_config(cfg), "config.yaml")
    return tracker


def run_dir_lock(run_dir: Path | str) -> AbstractContextManager[None]:
    """The lock one training job holds on its run directory, per rank: a second job on the same directory refuses
    (naming the holder) instead of writing every metrics line twice and racing MLflow's database.

    One lock file per rank (``RANK``, 0 outside a launcher), so the ranks of one job never refuse each other, while
    any second job's rank 0 meets the first job's rank 0 (the launcher then stops its other ranks). The files live
    beside the run directory (``.<name>.locks/``), outside the DVC output.
    """
    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    lock = run_dir.parent / f".{run_dir.name}.locks" / f"rank{rank}.lock"
    return exclusive(lock, f"train.run_dir {run_dir} (rank {rank})")


def train_stage(cfg: RunConfig, stage: str | int, *, resume: bool = False) -> StageResult:
    """Train one SACL stage to its configured step count (collective over the launched ranks), holding the run
    directory's lock (``run_dir_lock``)."""
    with run_dir_lock(cfg.train.run_dir), quiet_deprecated_collectives():
        return _train_stage(cfg, stage, resume=resume)


def _train_stage(cfg: RunConfig, stage: str | int, *, resume: bool) -> StageResult:
    train = cfg.train
    plan = stage_plans(train)[stage] if isinstance(stage, int) else find_stage(train, stage)
    st = plan.stage
    # Fail on a bad tracking server before any heavy work (every rank checks, so all of them stop).
    check_tracking_reachable(cfg.tracking.resolve_uri(train.run_dir), cfg.tracking.check_timeout_s)
    # Every rank decides from the same files (run_dir is shared), so all of them stop together.
    if not resume and (plan.checkpoints / "latest").exists():
        raise UltraFluxError(
            f"{plan.dir} already holds checkpoints of stage {st.name}: pass --resume to continue it, or choose "
            "another train.run_dir"
        )
    dist = init_distributed(train.deepspeed)
    grad_accum = st.grad_accum(dist.world_size)  # refuses a global batch the ranks cannot split evenly
    plan.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train.seed)
    import deepspeed

    from ultraflux_model.training.latent_cache import CachedLatentDataset

    dataset = CachedLatentDataset(train.cache_dir, subset=None if st.subset == "all" else st.subset)
    stream = BatchStream(dataset, list(range(len(dataset))), st.micro_batch, seed=train.seed, dist=dist,
                         grad_accum=grad_accum)

    from ultraflux_model.checkpoint.resolve import resolve_checkpoint

    base = resolve_checkpoint(train.model)  # a local folder, or a hub id fetched as safetensors only
    ds_config = deepspeed_config(train.deepspeed, st, dist.world_size)
    model = _build_model(train, plan, base, ds_config, dist.device)
    model.set_rope_kernel(cfg.kernels.rope)
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    guidance = train.guidance if model.config.guidance_embeds else None
    optimizer = torch.optim.AdamW(  # only what trains: all weights (full), the adapters (lora)
        [p for p in model.parameters() if p.requires_grad], lr=st.lr, betas=train.betas, eps=train.eps,
        weight_decay=train.weight_decay,
    )
    warmup = st.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config, dist_init_required=False,
    )
    dtype = torch.bfloat16 if use_bf16(train.deepspeed) else torch.float32
    ema = ShardedEma(engine.module, train.ema.decay) if train.ema.enabled else None
    checkpoints = CheckpointManager(plan.checkpoints, train.checkpoint.keep_last, dist)

    start = 0
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state = checkpoints.load(engine, latest, ema)
        stream.load_state_dict(state["sampler"])
        start = int(state["step"])

    tracker = _tracker_for(cfg, plan, dist, resume)
    result = StageResult(name=st.name, export=plan.export, resumed_from=start, run_id=tracker.run_id)
    window: dict[str, list[float]] = {}  # per-timestep-band losses of this rank's samples since the last log
    try:
        for step in trange(start, st.steps, initial=start, total=st.steps, desc=st.name, unit="step",
                           disable=not dist.is_main):
            started = time.perf_counter()
            # the lr this step's update uses: DeepSpeed steps the scheduler right after the optimizer, so after the
            # loop get_lr() already returns the next step's
            step_lr = engine.get_lr()[0]
            # [summed micro-batch losses, images, image tokens] of this rank, all-reduced once per step
            totals = torch.zeros(3, dtype=torch.float64)
            for micro in range(grad_accum):
                batch = stream.next(dist.device)
                b, _, h, w = batch["latents"].shape
                noise, t = draw_noise_and_t(
                    tuple(batch["latents"].shape), first_sample_of(micro, dist.rank, dist.world_size, b),
                    seed=train.seed, stage_index=plan.index, step=step, stage=st, timesteps=train.timesteps,
                )
                t = t.to(dist.device)
                pred_x0, target = predict_x0(engine, batch, noise, t, guidance=guidance, dtype=dtype)
                loss = training_loss(pred_x0, target, t, cfg=train.loss, kernel=cfg.kernels.loss)
                engine.backward(loss)
                engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
                totals += torch.tensor([loss.item(), b, b * (h // 2) * (w // 2)], dtype=torch.float64)
                samples = per_sample_losses(pred_x0, target, t, train.loss, cfg.kernels.loss)
                for tv, lv in zip(t.tolist(), samples.tolist(), strict=True):
                    window.setdefault(band_name(tv), []).append(lv)
            if ema is not None:
                ema.update()
            loss_sum, images, tokens = sum_across_ranks(totals).tolist()
            mean_loss = loss_sum / (grad_accum * dist.world_size)
            seconds = time.perf_counter() - started
            result.steps.append(step + 1)
            result.losses.append(mean_loss)

            if (step + 1) % train.log_every == 0 or step + 1 == st.steps:
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "loss": mean_loss,
                    "lr": step_lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "step_time_s": seconds,
                    "images_per_s": images / seconds,
                    "tokens_per_s": tokens / seconds,
                    "peak_memory_gb": peak_memory_gb(dist.device),
                    **{name: float(np.mean(values)) for name, values in window.items()},
                }
                window.clear()
                if dist.is_main:
                    tracker.log_metrics(metrics, step=step + 1)
                    with open(plan.metrics, "a") as fh:
                        fh.write(json.dumps({"step": step + 1, **metrics}) + "\n")

            last = step + 1 == st.steps
            if (step + 1) % train.checkpoint.every == 0 or last:
                checkpoints.save(engine, step + 1, {"sampler": stream.state_dict()}, ema)
            if last or (train.sample_every and (step + 1) % train.sample_every == 0):
                _export(engine, ema, plan, base, dist, train)
                if dist.is_main and train.sample_sizes:
                    write_sample_grids(plan.export, cfg, plan.dir / "samples" / f"step{step + 1:07d}", tracker,
                                       step + 1, st.name, dist.device, dataset.text_tokens,
                                       base if train.method == "lora" else None)
        if start >= st.steps and not (plan.dir / DONE_MARKER).exists():
            _export(engine, ema, plan, base, dist, train)  # resumed after the last checkpoint, before the export
        if dist.is_main:
            (plan.dir / DONE_MARKER).write_text(f"{st.steps}\n")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return result


def _export(engine: Any, ema: ShardedEma | None, plan: StagePlan, base: Path, dist: DistInfo,
            train: TrainConfig) -> None:
    """Write ``export/`` (and ``export_ema/``): the base checkpoint with the gathered trained (EMA) transformer.

    Each is assembled atomically by ``assemble_checkpoint`` (frozen components hard-linked where possible), so
    it is always a complete checkpoint that ``ultraflux generate`` and the next stage load. With LoRA each is an
    adapter folder instead (``ultraflux_model.lora.adapters``), written atomically too.
    """
    from ultraflux_model.checkpoint.layout import assemble_checkpoint

    targets = [(plan.export, None)]
    if ema is not None:
        targets.append((plan.export_ema, ema.full_tensors(dist.is_main)))  # collective: every rank gathers
    if train.method == "lora":
        _export_adapters(engine.module, targets, base, dist, train)
        return
    for out, replace in targets:
        gathered = export_transformer(engine.module, plan.dir / f".gathered-{out.name}", dist, replace=replace)
        if dist.is_main:
            assemble_checkpoint(base, out, {TRANSFORMER_DIR: gathered})
            shutil.rmtree(gathered)
        barrier()


def _export_adapters(module: torch.nn.Module, targets: list[tuple[Path, dict[str, torch.Tensor] | None]], base: Path,
                     dist: DistInfo, train: TrainConfig) -> None:
    """Collective: gather the (possibly partitioned) adapter weights once and write each target's adapter folder
    (the EMA target's weights replaced by its averages)."""
    from ultraflux_model.checkpoint.layout import fingerprint
    from ultraflux_model.lora.adapters import adapter_state, save_adapter
    from ultraflux_model.lora.targets import target_modules

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    gathered = gather_full_tensors(module, names, dist)
    if dist.is_main:
        lora = train.lora
        meta = {"base": train.model, "base_fingerprint": fingerprint(base / TRANSFORMER_DIR), "rank": lora.rank,
                "alpha": lora.alpha, "dropout": lora.dropout, "preset": lora.targets,
                "targets": target_modules(lora.targets), "method": "lora"}
        for out, replace in targets:
            save_adapter(module, out, meta, adapter_state(module, {**gathered, **(replace or {})}))
    barrier()


def train(cfg: RunConfig, *, resume: bool = False, stages: list[str] | None = None) -> list[StageResult]:
    """Run the configured stages in order (each starts from the previous one's export).

    With ``resume`` finished stages are skipped and an interrupted one continues from its latest checkpoint.
    """
    plans = stages_to_run(cfg.train, resume=resume, only=stages)
    run_dir = Path(cfg.train.run_dir)
    with run_dir_lock(run_dir):
        check_tracking_reachable(cfg.tracking.resolve_uri(run_dir), cfg.tracking.check_timeout_s)
        run_dir.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", "0")) == 0:
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        return [_train_stage(cfg, plan.index, resume=resume) for plan in plans]
