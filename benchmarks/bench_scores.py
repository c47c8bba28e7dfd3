"""Weight-free dataset scores at native 4K: ours against the official approach, side by side in one run.

Official approach (what the UltraFlux filter script does per image): grayscale, then for every full 240×240 patch
``cv2.Sobel(patch, CV_64F, 1, 0)`` / ``(0, 1)``, ``np.sqrt(gx**2 + gy**2)``, ``np.var`` (the eval tests'
reference ``ref_flat_percentage``), and ``skimage.measure.shannon_entropy`` of the grayscale image. Ours:
``ultraflux_eval.metrics.scores.flat_and_entropy`` (one grayscale conversion, int16 Sobel into reused buffers, a
``calcHist`` histogram). Both values must be identical (asserted before timing).

    python -m benchmarks.bench_scores [--repeats 3] [--sizes 3840x2160 4096x4096 5440x3072 6336x2624]

Writes ``benchmarks/results/data_scores.{csv,json}`` and prints the table.
"""

from __future__ import annotations

import argparse

import torch
from skimage.measure import shannon_entropy as skimage_entropy
from tests.eval.test_eval_scores import ref_flat_percentage, ref_gray
from ultraflux_eval.metrics import scores

from benchmarks.bench_eval import photo_like
from benchmarks.report import print_rows, save_rows
from benchmarks.timing import median_seconds

CPU = torch.device("cpu")


def official(rgb) -> tuple[float, float]:
    """The official per-image computation: per-patch float64 Sobel flatness + skimage entropy."""
    return ref_flat_percentage(rgb), float(skimage_entropy(ref_gray(rgb)))


def bench_size(width: int, height: int, repeats: int) -> dict:
    rgb = photo_like(height, width, seed=width)
    ours_values, official_values = scores.flat_and_entropy(rgb), official(rgb)
    if ours_values != official_values:
        raise AssertionError(f"{width}x{height}: ours {ours_values!r} != official {official_values!r}")
    ours_s = median_seconds(lambda: scores.flat_and_entropy(rgb), CPU, warmup=1, repeats=repeats)
    official_s = median_seconds(lambda: official(rgb), CPU, warmup=1, repeats=repeats)
    flat_official_s = median_seconds(lambda: ref_flat_percentage(rgb), CPU, warmup=1, repeats=repeats)
    flat_ours_s = median_seconds(lambda: scores.flat_percentage(rgb), CPU, warmup=1, repeats=repeats)
    return {
        "size": f"{width}x{height}",
        "megapixels": round(width * height / 1e6, 2),
        "flat_percentage": round(ours_values[0], 6),
        "shannon_entropy": round(ours_values[1], 6),
        "identical": True,
        "official_s": official_s,
        "ours_s": ours_s,
        "speedup": official_s / ours_s,
        "flat_official_s": flat_official_s,
        "flat_ours_s": flat_ours_s,
        "flat_speedup": flat_official_s / flat_ours_s,
        "images_per_s": 1.0 / ours_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["3840x2160", "4096x4096", "5440x3072", "6336x2624"])
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        rows.append(bench_size(width, height, args.repeats))
    save_rows(rows, "data_scores")
    print_rows(rows, ["size", "megapixels", "flat_percentage", "shannon_entropy", "identical", "official_s", "ours_s",
                      "speedup", "flat_official_s", "flat_ours_s", "flat_speedup", "images_per_s"],
               title="flat_percentage + shannon_entropy: official (per-patch float64 Sobel + skimage) vs ours "
                     "(CPU, median seconds)")


if __name__ == "__main__":
    main()
