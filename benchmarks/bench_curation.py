"""Curation at scale: the score and cache stages over one synthetic 4K set with the local engine and with Ray at
1 and 2 workers, and the projection to MultiAspect-4K-1M (1,000,000 images).

Per stage and engine: wall seconds, images/s and the speed-up over the local engine measured in the same run.
CPU-seconds per image are measured on the local engine (``time.process_time`` of this process: all its
threads). The projection multiplies those measured per-image CPU costs by 10^6. GPU-hours come from FLOP
counts, not from this CPU machine: the real-size F16 VAE encoder at the bucket size and the T5-XXL encoder
(v1.1 XXL shapes) at 512 tokens are counted on the meta device with ``torch.utils.flop_counter``, and divided
by an assumed sustained GPU throughput (``--gpu-tflops``, default 400 TFLOP/s ≈ 40 % of an H100's dense bf16
peak; the learned scorers' FLOPs are not counted).

    python -m benchmarks.bench_curation [--images 4] [--side 4096] [--workers 1 2]

The score stage runs the official weight-free scores (240-px patches; learned scorers off); the cache stage
runs on the tiny checkpoint (its CPU work: decode, resize, tiny VAE and text encoders). Writes
``benchmarks/results/data_curation.{csv,json}`` and ``data_curation_projection.{csv,json}``.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from ultraflux_data.config import ComputeConfig, ScoringConfig

from benchmarks.bench_eval import photo_like
from benchmarks.report import print_rows, save_rows

OFFICIAL = ScoringConfig(flat_patch=240, flat_threshold=800.0, qalign="none", aesthetics="none")
MILLION = 1_000_000


def encoder_flops(side: int, tokens: int = 512) -> dict[str, float]:
    """FLOPs per image of the real-size F16 VAE encoder at ``side``² and of the T5-XXL encoder at ``tokens``."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5EncoderModel
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    with torch.device("meta"):
        vae = UltraFluxAutoencoderKL()
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     feed_forward_proj="gated-gelu", vocab_size=32128))
    with FlopCounterMode(display=False) as vae_count:
        vae.encode(torch.empty(1, 3, side, side, device="meta"))
    with FlopCounterMode(display=False) as t5_count:
        t5(input_ids=torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    return {"vae_encoder": float(vae_count.get_total_flops()), "t5_xxl": float(t5_count.get_total_flops())}


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _engines(workers: list[int]) -> list[tuple[str, ComputeConfig]]:
    engines = [("local", ComputeConfig(engine="local", partition_size=1))]
    engines += [(f"ray x{n}", ComputeConfig(engine="ray", workers=n, partition_size=1)) for n in workers]
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--side", type=int, default=4096, help="square side of the synthetic images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed sustained GPU TFLOP/s")
    args = parser.parse_args()
    family = "4k" if args.side >= 3072 else "2k" if args.side >= 1536 else "1k" if args.side >= 768 else "512"

    import ray
    from ultraflux_data.cache import build_caches
    from ultraflux_data.ingest import ingest
    from ultraflux_data.scoring import score_manifest
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bc", dir="/tmp"))  # short: Ray's socket paths live below it
    rows = []
    try:
        src = tmp / "src"
        src.mkdir()
        for i in range(args.images):
            Image.fromarray(photo_like(args.side, args.side, seed=i)).save(src / f"{i}.png", compress_level=1)
        ingest(src, tmp / "ingest", progress=False)
        model = write_tiny_checkpoint(tmp / "tiny")
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "r"))
        stages = {
            "score": lambda out, compute: score_manifest(tmp / "ingest", out / "scores.parquet", OFFICIAL,
                                                         progress=False, compute=compute),
            "cache": lambda out, compute: build_caches(tmp / "ingest", model, out, max_sequence_length=32,
                                                       batch_size=1, family=family, progress=False, compute=compute),
        }
        for stage, run in stages.items():
            reference = None
            for name, compute in _engines(args.workers):
                out = tmp / f"{stage}-{name.replace(' ', '')}"
                wall, cpu = _time(functools.partial(run, out, compute))
                reference = reference or wall
                rows.append({"stage": stage, "engine": name, "workers": compute.workers, "images": args.images,
                             "side": args.side, "wall_s": wall, "images_per_s": args.images / wall,
                             "speedup_vs_local": reference / wall,
                             "cpu_s_per_image": cpu / args.images if compute.engine == "local" else None})
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    save_rows(rows, "data_curation")
    print_rows(rows, ["stage", "engine", "workers", "images", "side", "wall_s", "images_per_s", "speedup_vs_local",
                      "cpu_s_per_image"], title="score and cache stages: local vs Ray (CPU, this machine)")

    flops = encoder_flops(args.side)
    local = {r["stage"]: r for r in rows if r["engine"] == "local"}
    gpu_s = {name: value / (args.gpu_tflops * 1e12) for name, value in flops.items()}
    projection = [
        {"stage": "score (weight-free, CPU)", "per_image": f"{local['score']['cpu_s_per_image']:.3f} CPU-s",
         "cpu_hours_1m": local["score"]["cpu_s_per_image"] * MILLION / 3600, "gpu_hours_1m": 0.0},
        {"stage": "cache: decode + resize (CPU, measured with tiny encoders)",
         "per_image": f"{local['cache']['cpu_s_per_image']:.3f} CPU-s",
         "cpu_hours_1m": local["cache"]["cpu_s_per_image"] * MILLION / 3600, "gpu_hours_1m": 0.0},
        {"stage": f"cache: F16 VAE encoder {args.side}² (GPU)",
         "per_image": f"{flops['vae_encoder'] / 1e12:.1f} TFLOP",
         "cpu_hours_1m": 0.0, "gpu_hours_1m": gpu_s["vae_encoder"] * MILLION / 3600},
        {"stage": "cache: T5-XXL encoder 512 tokens (GPU)", "per_image": f"{flops['t5_xxl'] / 1e12:.1f} TFLOP",
         "cpu_hours_1m": 0.0, "gpu_hours_1m": gpu_s["t5_xxl"] * MILLION / 3600},
    ]
    save_rows(projection, "data_curation_projection")
    print_rows(projection, ["stage", "per_image", "cpu_hours_1m", "gpu_hours_1m"],
               title=f"projection to 1,000,000 images (GPU at {args.gpu_tflops:.0f} TFLOP/s sustained)")


if __name__ == "__main__":
    main()
