"""One evaluation end to end: check the tracking store, evaluate, write the report, log one MLflow run.

The CLI (``ultraflux-eval evaluate``) and the Prefect flow (``flows/eval_flow.py``) both call
:func:`run_evaluation`, so a directory of images from any generator and our own generations go through the
same steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ultraflux_core.tracking.lineage import git_sha

from ultraflux_eval.backbones.loading import backbones_from_config
from ultraflux_eval.config import EvalConfig
from ultraflux_eval.metrics.aesthetic import ImageScorer
from ultraflux_eval.metrics.scores import ImageLike
from ultraflux_eval.metrics.table import protocol_mismatches
from ultraflux_eval.protocol.evaluate import EvalResults, evaluate, list_images, validate_inputs
from ultraflux_eval.protocol.logging import log_evaluation, reachable_tracking_uri
from ultraflux_eval.protocol.report import ReportContext, write_report


@dataclass(frozen=True)
class EvaluationRun:
    results: EvalResults
    report_dir: Path
    run_id: str | None
    tracking_uri: str | None


def comparability(config: EvalConfig) -> str:
    """Whether the paper's metrics of this run are computed under the protocols that make them comparable with the
    paper's table (the metric table's ``protocol`` column): ``yes``, or ``no: ...`` naming what differs."""
    if config.backbones.source == "tiny":
        return "no: tiny backbones"
    mismatches = protocol_mismatches(config.benchmark.metrics, config.benchmark.model_dump(mode="json"))
    return "no: " + "; ".join(mismatches) if mismatches else "yes"


def generated_by(images: Sequence[ImageLike]) -> tuple[str, str]:
    """``(model, content hash)`` named by the images' JSON sidecars (what our generator writes beside each PNG);
    ``("-", "-")`` for images without one, several values joined when the images come from several models."""
    seen: dict[tuple[str, str], None] = {}
    for image in images:
        if not isinstance(image, (str, Path)):
            continue
        try:
            side = json.loads(Path(image).with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(side, dict) and side.get("model_hash"):
            seen[(str(side.get("model", "-")), str(side["model_hash"]))] = None
    if not seen:
        return "-", "-"
    return ", ".join(dict.fromkeys(m for m, _ in seen)), ", ".join(dict.fromkeys(h for _, h in seen))


def run_name(results: EvalResults, model: str, backbones: str) -> str:
    """What the MLflow run list shows: what was evaluated, on which metrics and benchmark, with which backbones
    (e.g. ``eval ultraflux-ab12 · 6 metrics (glcm, clip_score, …) · aesthetic-eval-tiny · tiny backbones``)."""
    shown = Path(model).name if model not in ("", "-") and "://" not in model and ":/" not in model else model
    metrics = results.metrics
    listed = ", ".join(metrics[:3]) + (", …" if len(metrics) > 3 else "")
    return f"eval {shown or 'images'} · {len(metrics)} metrics ({listed}) · {results.benchmark} · {backbones} backbones"


def run_evaluation(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    config: EvalConfig,
    out_dir: Path,
    *,
    aspects: Sequence[str] | None = None,
    params: Mapping[str, object] | None = None,
    tags: Mapping[str, str] | None = None,
    scorers: Mapping[str, ImageScorer] | None = None,
    log: bool = True,
    about: Mapping[str, str] | None = None,
    champion: tuple[str, Mapping[str, float]] | None = None,
) -> EvaluationRun:
    """Evaluate ``images``/``prompts`` by ``config.benchmark``, write the report to ``out_dir``, log to MLflow.

    An unreachable tracking store and bad input (counts, unreadable files, sizes) fail here, before any
    network is loaded or image scored. The report's header names the model and content hash (from the images'
    sidecars unless ``about`` gives them), the date, the git sha, the protocol and the backbones; ``champion``
    (``(label, {"<metric>/overall": value})``) adds the champion's column to its reference table.
    """
    uri = reachable_tracking_uri(config.tracking) if log else None
    spec = config.benchmark
    reference = list_images(spec.reference_dir) if spec.reference_dir is not None else None
    validate_inputs(images, prompts, spec, aspects, reference)  # cheap checks before loading any network
    backbones = backbones_from_config(
        config.backbones.source, config.backbones.weights_dir, spec.metrics, spec.fid_size, spec.fid_resize
    )
    results = evaluate(
        images, prompts, spec, backbones=backbones, aspects=aspects, reference=reference, scorers=scorers,
        batch_size=config.backbones.batch_size, device=config.backbones.device, progress=True,
    )
    model, model_hash = generated_by(images)
    header = {
        "model": (params or {}).get("model") or model,
        "content hash (sha256)": model_hash,
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "git sha": git_sha(Path(__file__).resolve().parent),
        "protocol": f"{spec.name}: seeds {','.join(map(str, spec.seeds))} ({spec.seed_policy}), fid_resize "
                    f"{spec.fid_resize}, clip_truncation {spec.clip_truncation}; comparable with the paper: "
                    f"{comparability(config)}",
        "backbones": config.backbones.source,
        **(about or {}),
    }  # fmt: skip
    header["model"] = str(header["model"])
    context = ReportContext(about=header, backbones=config.backbones.source, champion=champion)
    write_report(results, images, out_dir, columns=spec.grid_columns, context=context)
    run_id = None
    if uri is not None:
        run_params = {
            "backbones": config.backbones.source,
            "metrics": ",".join(results.metrics),
            "seeds": ",".join(map(str, spec.seeds)),
            "seed_policy": spec.seed_policy,
            "fid_resize": spec.fid_resize,
            "clip_truncation": spec.clip_truncation,
            "comparable_with_paper": comparability(config),
            "n_images": len(images),
            **(params or {}),
        }
        name = run_name(results, header["model"], config.backbones.source)
        run_id = log_evaluation(results, out_dir, config.tracking, params=run_params, tags=tags, run_name=name)
    return EvaluationRun(results, Path(out_dir), run_id, uri)
