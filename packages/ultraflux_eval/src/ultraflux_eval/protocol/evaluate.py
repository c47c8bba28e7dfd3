"""The evaluation protocol: images + prompts in, per-aspect-ratio and overall tables out.

``evaluate`` checks everything that can be checked cheaply first (counts, readable headers, sizes against each
metric's minimum, a reference set where FID is asked for), then computes:

- per image: ``glcm``, ``shannon_entropy``, ``flat_percentage``, ``clip_score``, ``aesthetic``, ``pickscore``,
  ``hps``, ``hpsv3``, ``musiq``, ``qalign``, ``artimuse``, and any injected
  :class:`~ultraflux_eval.metrics.aesthetic.ImageScorer` (Q-Align, MUSIQ, ...);
- per set: ``compression_ratio`` (Σ raw ÷ Σ JPEG bytes), ``fid`` (whole images) and ``patch_fid`` (native crops)
  against the reference images.

The table has one row per aspect ratio of the spec plus ``overall``: per-image metrics are means over the
row's images; set metrics are recomputed on the row's set. ``overall`` is the mean over all images (every image
weighs the same), NOT the mean of the aspect rows' means: the two differ whenever the aspect groups have unequal
sizes (docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from ultraflux_eval.backbones.loading import Backbones, tiny_backbones
from ultraflux_eval.config import AspectSize, BenchmarkConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics import scores
from ultraflux_eval.metrics.aesthetic import ImageScorer, image_scorer
from ultraflux_eval.metrics.alignment import PreferenceScorer, clip_score
from ultraflux_eval.metrics.fidelity import FrechetDistance, fid_inputs, patch_inputs
from ultraflux_eval.metrics.scores import ImageLike
from ultraflux_eval.metrics.table import IMAGE_METRICS, REFERENCE_METRICS, SET_METRICS, require_metric

OVERALL = "overall"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


@dataclass
class EvalResults:
    """Per-image rows and the aggregated table ``{aspect | "overall": {metric: value}}``."""

    benchmark: str
    aspects: list[str]
    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    table: dict[str, dict[str, float]] = field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        """``{"<metric>/<aspect>": value}`` for MLflow (aspects with no image are left out)."""
        return {f"{metric}/{aspect}": value for aspect, row in self.table.items() for metric, value in row.items()}


def benchmark_prompts(spec: BenchmarkConfig) -> list[str]:
    """The spec's prompts: ``prompts_file`` (one per line, blank lines skipped) when set, else ``prompts``."""
    if spec.prompts_file is None:
        prompts = list(spec.prompts)
    else:
        path = Path(spec.prompts_file)
        if not path.is_file():
            raise EvalError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvalError("the benchmark has no prompts: set eval.benchmark.prompts or a non-empty prompts_file")
    return prompts


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"image directory {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_dir(folder: Path, prompts_file: Path | None = None) -> tuple[list[Path], list[str]]:
    """Images of a directory and their prompts.

    With ``prompts_file``: one prompt per line, paired with the images in name order. Without: each image's
    ``<stem>.json`` sidecar must hold a ``"prompt"`` (what the generator writes).
    """
    images = list_images(folder)
    if not images:
        raise EvalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise EvalError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(prompts) != len(images):
            raise EvalError(
                f"{len(images)} images in {folder} but {len(prompts)} prompts in {path}: one line per image"
            )
        return images, prompts
    prompts = []
    for image in images:
        sidecar = image.with_suffix(".json")
        try:
            prompts.append(str(json.loads(sidecar.read_text(encoding="utf-8"))["prompt"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EvalError(
                f"no prompt for {image}: expected {sidecar} with a \"prompt\" field, or pass a prompts file"
            ) from err
    return images, prompts


def nearest_aspect(width: int, height: int, aspects: Sequence[AspectSize]) -> str:
    """Name of the spec aspect ratio closest in log-ratio to ``width / height``."""
    target = math.log(width / height)
    return min(aspects, key=lambda a: abs(math.log(a.width / a.height) - target)).name


def _minimum_side(metrics: Sequence[str], spec: BenchmarkConfig) -> dict[str, int]:
    need = {}
    if "glcm" in metrics:
        need["glcm"] = scores.GLCM_TILE
    if "patch_fid" in metrics:
        need["patch_fid"] = spec.patch_size
    return need


def validate_spec(spec: BenchmarkConfig) -> None:
    """Checks a generator run needs before producing anything: every benchmark size meets each metric's minimum,
    FID has a reference directory and at least two images per aspect ratio (prompts × seeds)."""
    problems = [
        f"aspect {a.name} is {a.width}x{a.height}: {metric} needs both sides >= {side}"
        for metric, side in _minimum_side(spec.metrics, spec).items()
        for a in spec.aspect_ratios
        if min(a.width, a.height) < side
    ]
    if any(m in REFERENCE_METRICS for m in spec.metrics):
        if spec.reference_dir is None or not list_images(spec.reference_dir):
            problems.append("fid/patch_fid need eval.benchmark.reference_dir with reference images")
        if len(benchmark_prompts(spec)) * len(spec.seeds) < 2:
            problems.append("FID needs at least 2 images per aspect ratio: add prompts or seeds")
    if problems:
        raise EvalError("the benchmark cannot be evaluated:\n  " + "\n  ".join(problems))


def validate_inputs(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    spec: BenchmarkConfig,
    aspects: Sequence[str] | None,
    reference: Sequence[ImageLike] | None,
) -> tuple[list[tuple[int, int]], list[str]]:
    """Cheap checks before any heavy work; returns each image's ``(width, height)`` and aspect name."""
    if len(images) == 0:
        raise EvalError("no images to evaluate")
    for metric in spec.metrics:  # an optional extra that is missing fails here, naming its install line
        require_metric(metric)
    if len(images) != len(prompts):
        raise EvalError(f"{len(images)} images but {len(prompts)} prompts: they must pair one to one")
    if aspects is not None and len(aspects) != len(images):
        raise EvalError(f"{len(images)} images but {len(aspects)} aspect labels")
    sizes = [scores.resolution(image) for image in images]  # headers only; raises on missing/unreadable files
    names = [a.name for a in spec.aspect_ratios]
    if aspects is None:
        aspects = [nearest_aspect(w, h, spec.aspect_ratios) for w, h in sizes]
    unknown = sorted(set(aspects) - set(names))
    if unknown:
        raise EvalError(f"aspect labels {unknown} are not in the benchmark's aspect_ratios {names}")
    problems = []
    for metric, side in _minimum_side(spec.metrics, spec).items():
        for index, (w, h) in enumerate(sizes):
            if min(w, h) < side:
                problems.append(f"image {index} is {w}x{h}: {metric} needs both sides >= {side}")
    if problems:
        raise EvalError("images below a metric's minimum size:\n  " + "\n  ".join(problems))
    if any(m in REFERENCE_METRICS for m in spec.metrics):
        if not reference:
            raise EvalError(
                f"{[m for m in spec.metrics if m in REFERENCE_METRICS]} need reference images: set "
                "eval.benchmark.reference_dir (or pass reference=...), or drop fid/patch_fid from "
                "eval.benchmark.metrics"
            )
        ref_sizes = [scores.resolution(image) for image in reference]
        if len(ref_sizes) < 2:
            raise EvalError(f"FID needs at least 2 reference images, got {len(ref_sizes)}")
        if "patch_fid" in spec.metrics and any(min(s) < spec.patch_size for s in ref_sizes):
            raise EvalError(f"reference images must be at least {spec.patch_size}x{spec.patch_size} for patch_fid")
        for name in set(aspects):
            count = list(aspects).count(name)
            if count < 2:
                raise EvalError(
                    f"aspect {name} has {count} image; FID needs at least 2 per aspect (add seeds or prompts)"
                )
    return sizes, list(aspects)


def evaluate(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    spec: BenchmarkConfig,
    *,
    backbones: Backbones | None = None,
    aspects: Sequence[str] | None = None,
    reference: Sequence[ImageLike] | None = None,
    scorers: Mapping[str, ImageScorer] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> EvalResults:
    """Score ``images`` (paired with ``prompts``) by ``spec``; aspects default to the nearest spec aspect ratio.

    ``backbones`` default to the tiny random ones; ``reference`` defaults to the images in
    ``spec.reference_dir``; ``scorers`` add per-image columns under their names; ``progress`` shows a bar.
    """
    if reference is None and spec.reference_dir is not None:
        reference = list_images(spec.reference_dir)
    sizes, labels = validate_inputs(images, prompts, spec, aspects, reference)
    metrics = list(spec.metrics) + list(scorers or {})
    backbones = backbones or tiny_backbones(spec.metrics, fid_size=spec.fid_size)
    rows: list[dict] = [
        {"index": i, "aspect": labels[i], "prompt": prompts[i], "width": w, "height": h}
        for i, (w, h) in enumerate(sizes)
    ]

    # Learned scorers, built once; the loop below decodes each image once and feeds every metric from it.
    image_scorers: dict[str, ImageScorer] = {
        **{m: image_scorer(m, backbones, batch_size, device) for m in IMAGE_METRICS if m in metrics},
        **(scorers or {}),
    }
    preference = {
        name: PreferenceScorer(name, backbones.require(name), name, batch_size, device)
        for name in ("pickscore", "hps")
        if name in metrics
    }
    fid_fake: list = []  # per image: the uint8 [3, S, S] FID input
    patch_fake: list = []  # per image: its native-resolution crops
    for start in track(range(0, len(images), batch_size), description="evaluating", disable=not progress):
        chunk = range(start, min(start + batch_size, len(images)))
        rgbs = [scores.load_rgb(images[i]) for i in chunk]
        texts = [prompts[i] for i in chunk]
        values: dict[str, Sequence[float]] = {}
        if "glcm" in metrics:
            values["glcm"] = [scores.glcm_score(rgb) for rgb in rgbs]
        if "shannon_entropy" in metrics:
            values["shannon_entropy"] = [scores.shannon_entropy(rgb) for rgb in rgbs]
        if "flat_percentage" in metrics:
            values["flat_percentage"] = [scores.flat_percentage(rgb) for rgb in rgbs]
        if "compression_ratio" in metrics:
            values["raw_bytes"] = [int(rgb.size) for rgb in rgbs]
            values["jpeg_bytes"] = [scores.jpeg_size(rgb) for rgb in rgbs]
        if "clip_score" in metrics:
            values["clip_score"] = clip_score(
                backbones.require("clip"), rgbs, texts, batch_size, device, truncation=spec.clip_truncation
            )
        for name, scorer in preference.items():
            values[name] = scorer.score(rgbs, texts)
        if "hpsv3" in metrics:
            values["hpsv3"] = backbones.require("hpsv3").score(rgbs, texts)
        for name, scorer in image_scorers.items():
            values[name] = np.asarray(scorer.score(rgbs), dtype=np.float64).reshape(-1)
        for name, column in values.items():
            if len(column) != len(rgbs):
                raise EvalError(f"scorer {name!r} returned {len(column)} scores for {len(rgbs)} images")
            for i, value in zip(chunk, column, strict=True):
                rows[i][name] = value if name.endswith("_bytes") else float(value)
        if "fid" in metrics:
            fid_fake += fid_inputs(rgbs, backbones.fid_size, backbones.fid_resize, spec.fid_crop_size)
        if "patch_fid" in metrics:
            patch_fake += [patch_inputs([rgb], spec.patch_size, spec.patches_per_image) for rgb in rgbs]

    groups = {a.name: [i for i, label in enumerate(labels) if label == a.name] for a in spec.aspect_ratios}
    groups = {name: idx for name, idx in groups.items() if idx}
    groups[OVERALL] = list(range(len(images)))
    table: dict[str, dict[str, float]] = {}
    for name, idx in groups.items():
        entry = {"n_images": float(len(idx))}
        for metric in metrics:
            if metric in SET_METRICS:
                continue
            entry[metric] = float(np.mean([rows[i][metric] for i in idx]))
        if "compression_ratio" in metrics:
            entry["compression_ratio"] = scores.ratio_from_sizes(
                [rows[i]["raw_bytes"] for i in idx], [rows[i]["jpeg_bytes"] for i in idx]
            )
        table[name] = entry

    extractor = backbones.require("inception") if any(m in REFERENCE_METRICS for m in metrics) else None
    if "fid" in metrics:
        real = fid_inputs(reference, backbones.fid_size, backbones.fid_resize, spec.fid_crop_size)
        fid = FrechetDistance(extractor, real, batch_size)
        for name, idx in groups.items():
            table[name]["fid"] = fid.distance([fid_fake[i] for i in idx])
    if "patch_fid" in metrics:
        reference_crops = patch_inputs(reference, spec.patch_size, spec.patches_per_image)
        pfid = FrechetDistance(extractor, reference_crops, batch_size)
        for name, idx in groups.items():
            table[name]["patch_fid"] = pfid.distance([crop for i in idx for crop in patch_fake[i]])

    return EvalResults(spec.name, [n for n in groups if n != OVERALL], metrics, rows, table)
