"""``make demo-lora``: fine-tune a LoRA on the tiny model from a handful of images with captions, then generate.

The images are written deterministically by the synthetic generator into a folder with a ``<name>.txt`` caption
beside each (what a user's own folder looks like), go through the real data stages (ingest → score → filter →
bucket → shard → cache), train one LoRA stage with the real trainer (tracked in MLflow), and the exported adapter
folder is applied to the base for one image per prompt. Settings: ``configs/lora-tiny.yaml`` over ``params.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer

from ultraflux.config import resolve_config

CONFIG = ["params.yaml", "configs/lora-tiny.yaml"]


def write_captioned_images(folder: Path, n: int, seed: int, side: int) -> Path:
    """``n`` synthetic images (the data package's renderer) as PNG, each with its caption in ``<stem>.txt``."""
    from ultraflux_data.synthetic import image_size, render_sample

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        width, height = image_size((1.0, 1.5, 0.75)[i % 3], side)
        image, caption = render_sample(rng, width, height)
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption + "\n")
    return folder


def main(config: list[str] = CONFIG, overrides: list[str] | None = None) -> dict[str, object]:
    from ultraflux_data import stages
    from ultraflux_model.checkpoint.tiny import ensure_checkpoint
    from ultraflux_model.inference.pipeline import generate, load_pipeline
    from ultraflux_model.training.curriculum import stage_plans
    from ultraflux_model.training.trainer import train

    started = time.perf_counter()
    cfg = resolve_config(config, list(overrides or []))
    base = ensure_checkpoint(cfg.train.model, init_tiny=True)
    write_captioned_images(Path(cfg.data.source), n=6, seed=cfg.data.synthetic.seed, side=96)
    for run in (stages.run_ingest, stages.run_score, stages.run_shard, stages.run_cache):
        if run is stages.run_shard:
            stages.run_filter(cfg.data)
            stages.run_bucket(cfg.data)
        run(cfg.data, progress=False)
    results = train(cfg, resume=True)
    adapter = stage_plans(cfg.train)[-1].export
    pipe = load_pipeline(base, dtype="fp32", device="cpu")
    images = generate(base, list(cfg.generate.prompts), list(cfg.generate.sizes), steps=cfg.generate.steps,
                      guidance=cfg.generate.guidance, shift=cfg.generate.shift, seed=cfg.generate.seed, dtype="fp32",
                      max_sequence_length=cfg.data.cache.max_sequence_length, out_dir=cfg.generate.out, pipe=pipe,
                      progress=False, lora=[str(adapter)])
    summary = {"adapter": str(adapter), "images": [str(i.path) for i in images],
               "losses": [r.losses[-1] for r in results if r.losses], "run_ids": [r.run_id for r in results],
               "seconds": round(time.perf_counter() - started, 1)}
    typer.echo(f"LoRA demo: adapter {adapter}, images {summary['images']}, {summary['seconds']} s; MLflow runs "
               f"{summary['run_ids']} in {cfg.tracking.resolve_uri(cfg.train.run_dir)}")
    return summary


if __name__ == "__main__":
    main()
