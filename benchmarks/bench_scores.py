"""Dataset scoring speed at native 4K: the vectorised flatness score against the straightforward per-patch loop,
and the whole weight-free scoring of one image (what ``ultraflux data score`` does per image).

For each size (4K bucket shapes) the same photo-like image (``benchmarks.bench_eval.photo_like``) is scored by
``ultraflux_eval.scores.flat_percentage`` (two Sobel calls over a framed mosaic) and by the per-patch loop the
eval tests use as the official reference (``tests.eval.test_eval_scores.ref_flat_percentage``, one Sobel pair
per 240×240 patch). The values must be identical (asserted, and the per-patch variances bitwise); the table
gives both times and their ratio.

A second table runs ``score_manifest`` (the ``ultraflux data score`` stage, weight-free scores at the official
240-px patches) over ``--images`` ingested 4K images with 1 and ``--workers`` spawned processes.

    python -m benchmarks.bench_scores [--repeats 3] [--sizes 3840x2160 4096x4096 5440x3072 6336x2624]
                                      [--images 8] [--workers 2]

Writes ``benchmarks/results/data_scores.{csv,json}`` and ``data_scores_parallel.{csv,json}``, prints tables.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ultraflux_eval import scores
from ultraflux_model.config import ScoringConfig
from ultraflux_model.data.ingest import ingest
from ultraflux_model.data.scoring import score_images

from benchmarks.bench_eval import photo_like
from benchmarks.report import print_rows, save_rows
from benchmarks.timing import median_seconds
from tests.eval.test_eval_scores import ref_flat_percentage, ref_gray, ref_patch_variances

CPU = torch.device("cpu")
OFFICIAL = ScoringConfig(flat_patch=240, flat_threshold=800.0, qalign="none", aesthetics="none")


def bench_size(width: int, height: int, repeats: int) -> dict:
    rgb = photo_like(height, width, seed=width)
    fast_value = scores.flat_percentage(rgb)
    loop_value = ref_flat_percentage(rgb)
    if fast_value != loop_value:
        raise AssertionError(f"{width}x{height}: vectorised {fast_value!r} != per-patch loop {loop_value!r}")
    variances = scores.patch_gradient_variances(scores.to_gray(rgb))
    if variances.tolist() != ref_patch_variances(ref_gray(rgb)):
        raise AssertionError(f"{width}x{height}: per-patch variances differ")
    fast = median_seconds(lambda: scores.flat_percentage(rgb), CPU, warmup=1, repeats=repeats)
    loop = median_seconds(lambda: ref_flat_percentage(rgb), CPU, warmup=1, repeats=repeats)
    whole = median_seconds(lambda: score_images([rgb], OFFICIAL), CPU, warmup=1, repeats=repeats)
    return {
        "size": f"{width}x{height}",
        "megapixels": round(width * height / 1e6, 2),
        "patches": int(variances.size),
        "flat_percentage": fast_value,
        "identical": True,
        "vectorised_s": fast,
        "per_patch_loop_s": loop,
        "speedup": loop / fast,
        "weight_free_scores_s": whole,
        "images_per_s": 1.0 / whole,
    }


_SCORE_RUN = """
import json, sys, time
from pathlib import Path
from ultraflux_model.config import ScoringConfig
from ultraflux_model.data.scoring import score_manifest
ingested, out, cfg = sys.argv[1], sys.argv[2], ScoringConfig.model_validate_json(sys.argv[3])
start = time.perf_counter()
score_manifest(Path(ingested), Path(out), cfg, progress=False)
print(json.dumps(time.perf_counter() - start))
"""


def bench_parallel(images: int, workers: int) -> list[dict]:
    """Wall time of the scoring stage over ``images`` ingested 3840x2160 images, with 1 and ``workers`` processes.

    Each run is its own interpreter with a light main module, as under ``ultraflux data score`` (spawned workers
    re-import the main module, so timing from inside this benchmark would charge them for its heavy imports).
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i in range(images):
            Image.fromarray(photo_like(2160, 3840, seed=i)).save(src / f"{i}.png", compress_level=1)
        ingest(src, Path(tmp) / "ingest", progress=False)
        for n in sorted({1, workers}):
            cfg = OFFICIAL.model_copy(update={"workers": n, "chunk_size": max(1, images // (2 * n))})
            out = subprocess.run([sys.executable, "-c", _SCORE_RUN, str(Path(tmp) / "ingest"),
                                  str(Path(tmp) / f"scores{n}.parquet"), cfg.model_dump_json()],
                                 capture_output=True, text=True, check=True)
            seconds = float(out.stdout.strip().splitlines()[-1])
            rows.append({"images": images, "size": "3840x2160", "workers": n, "seconds": seconds,
                         "images_per_s": images / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["3840x2160", "4096x4096", "5440x3072", "6336x2624"])
    parser.add_argument("--images", type=int, default=8, help="images for the parallel table (0 skips it)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        rows.append(bench_size(width, height, args.repeats))
    rows = [{**row, "flat_percentage": float(np.round(row["flat_percentage"], 6))} for row in rows]
    save_rows(rows, "data_scores")
    print_rows(rows, ["size", "megapixels", "patches", "flat_percentage", "identical", "vectorised_s",
                      "per_patch_loop_s", "speedup", "weight_free_scores_s", "images_per_s"],
               title="flat_percentage: vectorised vs per-patch loop (CPU, median seconds)")
    if args.images:
        parallel = bench_parallel(args.images, args.workers)
        save_rows(parallel, "data_scores_parallel")
        print_rows(parallel, ["images", "size", "workers", "seconds", "images_per_s"],
                   title="score stage (weight-free, 240-px patches): wall seconds incl. process spawn")


if __name__ == "__main__":
    main()
