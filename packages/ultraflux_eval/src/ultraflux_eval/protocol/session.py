"""One evaluation end to end: check the tracking store, evaluate, write the report, log one MLflow run.

The CLI (``ultraflux-eval evaluate``) and the Prefect flow (``flows/eval_flow.py``) both call
:func:`run_evaluation`, so a directory of images from any generator and our own generations go through the
same steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ultraflux_eval.backbones.loading import backbones_from_config
from ultraflux_eval.config import EvalConfig
from ultraflux_eval.metrics.aesthetic import ImageScorer
from ultraflux_eval.metrics.scores import ImageLike
from ultraflux_eval.metrics.table import protocol_mismatches
from ultraflux_eval.protocol.evaluate import EvalResults, evaluate, list_images, validate_inputs
from ultraflux_eval.protocol.logging import log_evaluation, reachable_tracking_uri
from ultraflux_eval.protocol.report import write_report


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
) -> EvaluationRun:
    """Evaluate ``images``/``prompts`` by ``config.benchmark``, write the report to ``out_dir``, log to MLflow.

    An unreachable tracking store and bad input (counts, unreadable files, sizes) fail here, before any
    network is loaded or image scored.
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
    write_report(results, images, out_dir, columns=spec.grid_columns)
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
        run_id = log_evaluation(results, out_dir, config.tracking, params=run_params, tags=tags)
    return EvaluationRun(results, Path(out_dir), run_id, uri)
