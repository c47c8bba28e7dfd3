"""The benchmark grid: every prompt at every aspect ratio, once per seed, from one loaded pipeline.

What the evaluation generates (its spec is the eval package's; this function takes plain values). Images land in
``<out_dir>/seed<seed>/<aspect with ':' as 'x'>/``, one folder per cell, so the layout names what each image is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ultraflux_model.checkpoint.resolve import resolve_checkpoint
from ultraflux_model.config import GenerateConfig, SeedPolicy
from ultraflux_model.inference.pipeline import GeneratedImage, generate, load_pipeline


@dataclass(frozen=True)
class GridImage:
    """One generated image of the grid and the aspect ratio (its label, e.g. ``16:9``) it was generated at."""

    image: GeneratedImage
    aspect: str


def generate_grid(
    model: str,
    prompts: Sequence[str],
    aspects: Sequence[tuple[str, int, int]],
    seeds: Sequence[int],
    settings: GenerateConfig,
    out_dir: Path,
    tracking_uri: str | None = None,
    seed_policy: SeedPolicy = "fixed",
) -> list[GridImage]:
    """Generate ``prompts`` × ``aspects`` (``(label, width, height)``) × ``seeds`` with ``settings`` (steps,
    guidance, shift, dtype, offload, decode mode, T5 length, transformer override); ``model`` may be a registry
    URI, fetched from ``tracking_uri`` through the model cache (the sidecars name the URI). Within a cell every
    prompt gets the cell's seed (``seed_policy="fixed"``, the official inference's protocol) or prompt k gets
    seed + k (``"per_prompt"``)."""
    pipe = load_pipeline(
        resolve_checkpoint(model, tracking_uri), dtype=settings.dtype, offload=settings.offload,
        transformer=settings.transformer,
    )
    grid: list[GridImage] = []
    for seed in seeds:
        for label, width, height in aspects:
            images = generate(
                model, list(prompts), [(width, height)], steps=settings.steps, guidance=settings.guidance,
                shift=settings.shift, seed=seed, dtype=settings.dtype, offload=settings.offload,
                vae_decode=settings.vae_decode, max_sequence_length=settings.max_sequence_length,
                out_dir=Path(out_dir) / f"seed{seed}" / label.replace(":", "x"), pipe=pipe, progress=False,
                seed_policy=seed_policy,
            )
            grid += [GridImage(image, label) for image in images]
    return grid
