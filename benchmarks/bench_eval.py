"""CPU time of each evaluation metric on one native-4K image: 4096×4096 and 2:1 at 5760×2880.

The test image is a photo-like procedural texture (smooth gradients, edges, noise of varying strength), so
the content-dependent costs (GLCM's non-zero co-occurrences, JPEG size) are realistic rather than worst case.
Learned metrics run with the tiny CI backbones; their rows measure our pre-processing and batching overhead
(for Q-Align: padding the 4K image to a square and CLIP preprocessing; for ArtiMuse: the bicubic tile), not a
production ViT-L or 7-8B MLLM. ``flat_percentage`` is also timed against the straightforward per-patch loop the
tests use as its reference (same values, asserted here too).

    python -m benchmarks.bench_eval [--repeats 3] [--sizes 4096x4096 5760x2880]

Writes ``benchmarks/results/eval_metrics.{csv,json}`` and prints a table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from tests.eval.test_eval_scores import ref_flat_percentage
from ultraflux_eval.backbones.loading import tiny_backbones
from ultraflux_eval.metrics import fidelity, scores
from ultraflux_eval.metrics.aesthetic import ClipAestheticScorer, image_scorer
from ultraflux_eval.metrics.alignment import clip_score

from benchmarks.report import print_rows, save_rows
from benchmarks.timing import median_seconds

CPU = torch.device("cpu")


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``: low-frequency colour fields, hard edges, and region-wise noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 110 + 60 * np.sin(xx / 350.0) * np.cos(yy / 500.0) + 40 * ((xx // 700 + yy // 600) % 2)
    region_noise = rng.uniform(0, 18, (height // 512 + 1, width // 512 + 1)).astype(np.float32)
    amplitude = np.kron(region_noise, np.ones((512, 512), np.float32))[:height, :width]
    channels = [
        base + shift + amplitude * rng.standard_normal((height, width), dtype=np.float32) for shift in (0, 12, -15)
    ]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def cases(rgb: np.ndarray) -> list[tuple[str, Callable[[], object]]]:
    nets = tiny_backbones(["clip_score", "aesthetic", "fid", "qalign", "artimuse"], fid_size=299)
    aesthetic = ClipAestheticScorer(nets.clip, nets.aesthetic_head)
    qalign, artimuse = image_scorer("qalign", nets), image_scorer("artimuse", nets)
    return [
        ("flat_percentage", lambda: scores.flat_percentage(rgb)),
        ("flat_percentage (per-patch loop ref)", lambda: ref_flat_percentage(rgb)),
        ("shannon_entropy", lambda: scores.shannon_entropy(rgb)),
        ("glcm", lambda: scores.glcm_score(rgb)),
        ("compression_ratio (JPEG q95)", lambda: scores.compression_ratio([rgb])),
        ("fid input (resize to 299)", lambda: fidelity.resize_uint8(rgb, 299)),
        ("patch_fid inputs (16 native 299 crops)", lambda: fidelity.patch_inputs([rgb], 299, 16)),
        ("clip_score (tiny CLIP)", lambda: clip_score(nets.clip, [rgb], ["a photo"])),
        ("aesthetic (tiny CLIP + head)", lambda: aesthetic.score([rgb])),
        ("qalign (tiny mPLUG-Owl2; square pad + CLIP preprocess)", lambda: qalign.score([rgb])),
        ("artimuse (tiny InternVL; bicubic 448-style tile)", lambda: artimuse.score([rgb])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["4096x4096", "5760x2880"], help="WIDTHxHEIGHT")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        rgb = photo_like(height, width)
        assert scores.flat_percentage(rgb) == ref_flat_percentage(rgb)  # the fast path must equal the loop
        for name, fn in cases(rgb):
            seconds = median_seconds(fn, CPU, warmup=1, repeats=args.repeats)
            rows.append({"metric": name, "size": f"{width}x{height}", "megapixels": round(width * height / 1e6, 1),
                         "seconds": seconds, "ms_per_mp": 1e3 * seconds / (width * height / 1e6)})
    save_rows(rows, "eval_metrics")
    print_rows(rows, ["metric", "size", "seconds", "ms_per_mp"], "Evaluation metrics, CPU, one image")


if __name__ == "__main__":
    main()
