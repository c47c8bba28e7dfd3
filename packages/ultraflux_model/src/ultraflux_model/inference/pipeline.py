"""Native-4K text-to-image generation with an UltraFlux checkpoint (local directory or hub id).

Follows the official inference: CLIP-L pooled + T5 (up to 512 tokens) text conditioning, FlowMatch Euler
with a static shift of 3.0 over ``steps`` sigmas from 1 to 1/steps, distilled guidance through the guidance
embedding, latents unpacked and un-scaled (``z / scaling + shift``) before the F16 VAE decode.

The components are held in a diffusers ``DiffusionPipeline`` subclass only so that accelerate's model and
sequential CPU offload hooks work; the sampling loop is ours and short enough to read top to bottom.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.layout import check_checkpoint_layout, fingerprint
from ultraflux_model.checkpoint.loading import check_local_component
from ultraflux_model.checkpoint.resolve import resolve_checkpoint
from ultraflux_model.config import (
    MAX_T5_TOKENS,
    AccelConfig,
    GenerateConfig,
    GenerateDtype,
    KernelChoice,
    Offload,
    SeedPolicy,
    ServeConfig,
)
from ultraflux_model.diffusion.latents import image_ids, latent_hw, pack_latents, text_ids, unpack_latents
from ultraflux_model.dtypes import TORCH_DTYPES, resolve_dtype
from ultraflux_model.inference.accel import (
    apply_load_time,
    check_accel,
    check_split,
    init_context_parallel,
    is_writer,
    load_time,
    set_cache,
)
from ultraflux_model.inference.limits import check_prompts, check_settings, check_sizes
from ultraflux_model.inference.png_info import png_info
from ultraflux_model.inference.stop import check_stop
from ultraflux_model.lora.apply import Adapter, read_specs, use_adapters
from ultraflux_model.modules.text_encoders import encode_prompts, load_text_encoders
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.vae.autoencoder import DecodeMode, UltraFluxAutoencoderKL

# ``callback(phase, done, total)``: phase is "denoise" (once per sampling step) or "decode" (before and after
# the VAE decode). Front-ends (the web app's progress bar, cancellation) hook in here instead of copying the loop.
StepCallback = Callable[[str, int, int], None]

logger = logging.getLogger(__name__)


class UltraFluxPipeline(DiffusionPipeline):
    """Holder of the seven components (enables ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``)."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: UltraFluxAutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: UltraFluxTransformer2DModel,
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )


def load_pipeline(
    model: str | Path,
    *,
    dtype: GenerateDtype = "auto",
    device: str | torch.device | None = None,
    offload: Offload = "none",
    transformer: UltraFluxTransformer2DModel | str | Path | None = None,
    rope_kernel: KernelChoice = "auto",
    accel: AccelConfig | None = None,
) -> UltraFluxPipeline:
    """Load every component (safetensors only) and place it per ``offload``.

    ``transformer`` replaces the checkpoint's own: a loaded model (e.g. a freshly exported training
    checkpoint) or a reference to one (directory or hub id, see :func:`load_transformer`), as diffusers
    pipelines take components from other sources. ``rope_kernel`` selects eager or fused RoPE in its
    attention layers. ``accel`` (default: none) applies the accelerators once the transformer is on its device
    (:mod:`~ultraflux_model.inference.accel`); the pipeline keeps it as ``pipe.accel``. ``dtype``
    ``auto``: bf16 on a GPU, fp32 on a CPU (:func:`resolve_dtype`).
    """
    root = resolve_checkpoint(model)
    check_checkpoint_layout(root)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)  # type: ignore[assignment]
    torch_dtype = TORCH_DTYPES[dtype]
    transformer_root: Path | None = None
    if isinstance(transformer, (str, Path)):
        transformer_root = transformer_dir(transformer)
        transformer = UltraFluxTransformer2DModel.from_pretrained(transformer_root, torch_dtype=torch_dtype)
    if offload != "none" and device.type != "cuda":
        raise UltraFluxError(
            f"--offload {offload} moves weights between CPU and a GPU; there is no GPU here (use none)"
        )
    accel = accel or AccelConfig()
    check_accel(accel, device, offload)
    text = load_text_encoders(root, dtype=dtype)
    pipe = UltraFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=UltraFluxAutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch_dtype),
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.tokenizer_2,
        transformer=transformer
        or UltraFluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype),
    )
    pipe.transformer.set_rope_kernel(rope_kernel)
    pipe.checkpoint_root = root  # type: ignore[attr-defined]
    pipe.transformer_root = transformer_root  # type: ignore[attr-defined]
    pipe.set_progress_bar_config(disable=True)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    apply_load_time(pipe.transformer, accel)
    set_cache(pipe.transformer, accel)
    pipe.accel = accel  # type: ignore[attr-defined]
    return pipe


def transformer_dir(source: str | Path) -> Path:
    """The local directory of a transformer given as a directory or hub id.

    Accepts a bare component (``config.json`` + safetensors at the top, as ``Owen777/UltraFlux-v1-1-Transformer``)
    or a whole checkpoint (its ``transformer/`` subfolder).
    """
    root = resolve_checkpoint(source)
    directory = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    check_local_component(directory, "diffusion_pytorch_model")
    return directory


@dataclass(frozen=True)
class GeneratedImage:
    """One written image and its sidecar (also saved as ``<path>.json``)."""

    path: Path
    prompt: str
    width: int
    height: int
    seed: int
    sidecar: dict[str, Any] = field(default_factory=dict)


def _peak_memory(device: torch.device) -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    peak = {"peak_host_rss_gb": rss_kb / (1 << 30 if sys.platform == "darwin" else 1 << 20)}
    if device.type == "cuda":
        peak["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    return peak


@torch.no_grad()
def sample_latents(
    pipe: UltraFluxPipeline,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    width: int,
    height: int,
    *,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise one image's packed latents with FlowMatch Euler; returns VAE-space latents ``[1, 16, H/16, W/16]``.

    ``callback("denoise", k, steps)`` runs after step ``k``; an exception it raises stops sampling.
    """
    device, transformer = pipe._execution_device, pipe.transformer
    h, w = latent_hw(width, height, pipe.vae.spatial_factor)
    # Noise is drawn on the CPU so a seed gives the same image on any device.
    noise = torch.randn((1, pipe.vae.config.latent_channels, h, w), generator=torch.Generator("cpu").manual_seed(seed))
    latents = pack_latents(noise).to(device, transformer.dtype)
    img_ids = image_ids(h // 2, w // 2, device=device)
    txt_ids = text_ids(prompt_embeds.shape[1], device=device)
    guidance_t = torch.full((1,), guidance, device=device) if transformer.config.guidance_embeds else None

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=shift, use_dynamic_shifting=False
    )
    # An array, not a Python list: one float32 per step, whatever the step count (the guard bounds it as well).
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).numpy(), device=device)
    timesteps = scheduler.timesteps
    cached = getattr(transformer, "is_cache_enabled", False)
    if cached:
        transformer._reset_stateful_cache()  # each image starts its cache afresh
    for k, t in enumerate(tqdm(timesteps, desc=f"{width}x{height}", leave=False, disable=not progress), 1):
        # diffusers' cache hooks keep their state per named context; one conditional pass per step here.
        context = transformer.cache_context("cond", step_index=k - 1, num_inference_steps=steps) if cached else None
        with context or nullcontext():
            velocity = transformer(
                hidden_states=latents,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                timestep=(t / 1000).expand(1).to(latents.dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance_t,
                return_dict=False,
            )[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if callback is not None:
            callback("denoise", k, len(timesteps))
    z = unpack_latents(latents, h, w)
    return z / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)


def prompt_notice(pipe: UltraFluxPipeline, prompt: str, max_sequence_length: int) -> str | None:
    """A one-line notice when ``prompt`` has more T5 tokens than are used (the rest is cut), else None."""
    tokens = len(pipe.tokenizer_2(prompt, truncation=False, add_special_tokens=True).input_ids)
    if tokens <= max_sequence_length:
        return None
    return (
        f"the prompt is {tokens} T5 tokens; only the first {max_sequence_length} are used "
        f"(the model reads at most {MAX_T5_TOKENS}): shorten it to keep its end"
    )


@torch.no_grad()
def decode_to_pil(pipe: UltraFluxPipeline, z: torch.Tensor, mode: DecodeMode) -> Image.Image:
    """VAE-decode ``[1, 16, h, w]`` latents into an RGB PIL image."""
    image = pipe.vae.decode(z.to(pipe.vae.dtype), mode=mode).sample[0]
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def generate(
    model: str | Path,
    prompts: list[str],
    sizes: list[tuple[int, int]],
    *,
    steps: int = 50,
    guidance: float = 4.0,
    shift: float = 3.0,
    seed: int = 0,
    dtype: GenerateDtype = "auto",
    offload: Offload = "none",
    vae_decode: DecodeMode = "tiled",
    max_sequence_length: int = 512,
    out_dir: Path | str = "artifacts/generated",
    device: str | None = None,
    pipe: UltraFluxPipeline | None = None,
    progress: bool = True,
    rope_kernel: KernelChoice = "auto",
    transformer: str | Path | None = None,
    callback: StepCallback | None = None,
    seed_policy: SeedPolicy = "per_prompt",
    limits: ServeConfig | None = None,
    lora: Sequence[str | tuple[Adapter, float]] = (),
    fuse_lora: bool = False,
    accel: AccelConfig | None = None,
) -> list[GeneratedImage]:
    """Generate every (prompt, size) pair; image ``k`` uses seed ``seed + k`` (``seed_policy="per_prompt"``) or
    ``seed`` (``"fixed"``, the official inference's one seed for every prompt). Writes PNG + JSON sidecar each.

    Sizes are ``(width, height)`` with sides multiples of 32; steps, guidance, shift and the seeds pass the one
    request guard (:func:`~ultraflux_model.inference.limits.check_settings`, ``limits`` default ``ServeConfig()``),
    all before any model is loaded. ``transformer`` (directory or hub id) replaces the checkpoint's transformer when
    the pipeline is loaded here; ``callback`` sees every denoising step and the decode of each image (see
    :data:`StepCallback`). Sampling stops with :class:`~ultraflux_model.inference.stop.Stopped` at the next step once
    the process-wide stop flag is set (SIGTERM in a server). A prompt longer than ``max_sequence_length`` T5 tokens
    is cut, with a logged warning and a ``notice`` in its sidecar.

    ``lora`` lists LoRA adapters as ``PATH[:SCALE]`` (or adapters already read, with their scales): each folder is
    read before the model is loaded, checked against the transformer it will run on, and active for these images
    (a shared ``pipe`` keeps them loaded; the next call turns off those it does not name, unfusing first);
    ``fuse_lora`` merges them into the weights (``ultraflux_model.lora.apply``). The sidecar lists them (``lora``).
    ``accel`` picks the accelerators (docs/inference.md "Accelerators"; default: those ``pipe`` was loaded with, else
    none). A given ``pipe`` takes a new cache setting per call; compile, quantize and parallel are fixed at its load.
    Under ``parallel: context`` every rank of the torchrun launch samples the image and rank 0 alone decodes and writes
    it (the other ranks return an empty list).
    """
    check_prompts(prompts)
    if seed_policy not in get_args(SeedPolicy):
        raise UltraFluxError(f"seed policy must be one of {list(get_args(SeedPolicy))}, got {seed_policy!r}")
    check_sizes(limits or ServeConfig(), sizes)
    if not 1 <= max_sequence_length <= MAX_T5_TOKENS:
        raise UltraFluxError(
            f"max_sequence_length must be between 1 and {MAX_T5_TOKENS} T5 tokens, got {max_sequence_length}"
        )
    settings = check_settings(limits or ServeConfig(), steps=steps, guidance=guidance, seed=seed, shift=shift,
                              images=len(prompts) * len(sizes) if seed_policy == "per_prompt" else 1)  # fmt: skip
    steps, guidance, seed, shift = settings.steps, settings.guidance, settings.seed, settings.shift
    if pipe is not None:
        loaded = getattr(pipe, "accel", AccelConfig())
        accel = accel or loaded
        if load_time(accel) != load_time(loaded):
            raise UltraFluxError(f"this pipeline was loaded with {load_time(loaded)}; reload it for {load_time(accel)}")
        set_cache(pipe.transformer, accel)
    else:
        accel = accel or AccelConfig()
        check_accel(accel, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), offload)
        if accel.parallel == "context":
            device = str(init_context_parallel())
    adapters = [spec for spec in lora if not isinstance(spec, str)]
    adapters += read_specs([spec for spec in lora if isinstance(spec, str)])

    def on_step(phase: str, done: int, total: int) -> None:
        if phase == "denoise":
            check_stop(done, total)
        if callback is not None:
            callback(phase, done, total)

    out_dir = Path(out_dir)  # created with the first image: a run failing before that leaves no empty folder

    started = time.perf_counter()
    pipe = pipe or load_pipeline(
        model, dtype=dtype, device=device, offload=offload, rope_kernel=rope_kernel, transformer=transformer,
        accel=accel,
    )
    lora_records = use_adapters(pipe, adapters, fuse_weights=fuse_lora)
    load_s = time.perf_counter() - started
    root: Path = pipe.checkpoint_root  # type: ignore[attr-defined]
    model_hash = fingerprint(root)
    transformer_root: Path | None = getattr(pipe, "transformer_root", None)
    # A transformer from another source is recorded beside the base checkpoint's hash, so the sidecar names
    # exactly which weights made the image.
    source = (
        {"transformer": str(transformer or transformer_root), "transformer_hash": fingerprint(transformer_root)}
        if transformer_root
        else {}
    )
    exec_device = pipe._execution_device
    if dtype == "auto":  # the sidecar names what ran: the weights' dtype
        dtype = next((k for k, v in TORCH_DTYPES.items() if v == pipe.transformer.dtype), "auto")  # type: ignore

    results: list[GeneratedImage] = []
    jobs = [(p, s) for p in prompts for s in sizes]
    notices = {p: prompt_notice(pipe, p, max_sequence_length) for p in prompts}
    for notice in filter(None, notices.values()):
        logger.warning(notice)
    for index, (prompt, (width, height)) in enumerate(tqdm(jobs, desc="images", disable=not progress)):
        image_seed = seed + index if seed_policy == "per_prompt" else seed
        if exec_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(exec_device)
        t0 = time.perf_counter()
        prompt_embeds, pooled = encode_prompts(
            pipe, [prompt], max_sequence_length, device=exec_device, dtype=pipe.transformer.dtype
        )
        t1 = time.perf_counter()
        check_split(pipe.transformer, prompt_embeds.shape[1], (width // 32) * (height // 32))
        z = sample_latents(
            pipe,
            prompt_embeds,
            pooled,
            width,
            height,
            steps=steps,
            guidance=guidance,
            shift=shift,
            seed=image_seed,
            progress=progress,
            callback=on_step,
        )
        t2 = time.perf_counter()
        if not is_writer():
            continue  # a helper rank of a context-parallel launch: rank 0 decodes and writes
        if callback is not None:
            callback("decode", 0, 1)
        image = decode_to_pil(pipe, z, vae_decode)
        t3 = time.perf_counter()
        if callback is not None:
            callback("decode", 1, 1)

        path = out_dir / f"{index:04d}_{width}x{height}_seed{image_seed}.png"
        sidecar = {
            "prompt": prompt,
            "seed": image_seed,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "shift": shift,
            "max_sequence_length": max_sequence_length,
            "dtype": dtype,
            "offload": offload,
            "vae_decode": vae_decode,
            **({"accel": accel.model_dump()} if accel != AccelConfig() else {}),
            "model": str(model),
            "model_hash": model_hash,
            **source,
            **({"lora": lora_records, "lora_fused": fuse_lora} if lora_records else {}),
            "device": str(exec_device),
            "timings_s": {
                "load": round(load_s, 4) if index == 0 else 0.0,
                "text_encode": round(t1 - t0, 4),
                "denoise": round(t2 - t1, 4),
                "vae_decode": round(t3 - t2, 4),
            },
            "memory": _peak_memory(exec_device),
            **({"notice": notices[prompt]} if notices[prompt] else {}),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp, pnginfo=png_info(sidecar))  # the settings travel inside the PNG too
        tmp.replace(path)  # atomic: a killed run never leaves a half-written PNG under the final name
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
        results.append(
            GeneratedImage(path=path, prompt=prompt, width=width, height=height, seed=image_seed, sidecar=sidecar)
        )
    return results


def generate_from_config(cfg: GenerateConfig, **overrides: Any) -> list[GeneratedImage]:
    """:func:`generate` with every argument taken from a :class:`GenerateConfig` (the CLI and flows use this)."""
    kwargs: dict[str, Any] = {
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "shift": cfg.shift,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "offload": cfg.offload,
        "vae_decode": cfg.vae_decode,
        "max_sequence_length": cfg.max_sequence_length,
        "out_dir": cfg.out,
        "transformer": cfg.transformer,
        "lora": cfg.lora,
        "fuse_lora": cfg.fuse_lora,
        "accel": cfg.accel,
    }
    kwargs.update(overrides)
    return generate(cfg.model, list(cfg.prompts), [tuple(s) for s in cfg.sizes], **kwargs)
