"""MLflow edge of the evaluation: one run per evaluation, metrics ``<metric>/<aspect>``, report artifacts, and
run-to-run comparison. The plumbing (URI, reachability, client, experiment) is ``ultraflux_core.tracking.uri``;
this module adds what an evaluation logs and the ``eval.tracking`` settings' advice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.uri import check_tracking_reachable, client_for, experiment_id

from ultraflux_eval.config import EVAL_STORE, TrackingConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.protocol.evaluate import EvalResults

ADVICE = f"set eval.tracking.tracking_uri (e.g. sqlite:///{EVAL_STORE} for a local store)"


def reachable_tracking_uri(config: TrackingConfig) -> str:
    """The section's tracking URI (:meth:`TrackingConfig.resolve_uri`), checked reachable before any heavy work;
    ``EvalError`` naming ``eval.tracking.tracking_uri`` otherwise."""
    uri = config.resolve_uri()
    try:
        check_tracking_reachable(uri, config.connect_timeout_s, advice=ADVICE)
    except UltraFluxError as err:  # the eval package's callers handle its own type
        raise EvalError(str(err)) from err
    return uri


def log_evaluation(
    results: EvalResults,
    report_dir: Path,
    config: TrackingConfig,
    params: Mapping[str, object] | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> str:
    """One MLflow run: params, ``<metric>/<aspect>`` metrics, the report folder as artifacts; returns the run id."""
    from mlflow.entities import Metric, Param, RunTag

    uri = reachable_tracking_uri(config)
    client = client_for(uri)
    run = client.create_run(
        experiment_id(client, config.experiment, uri), run_name=run_name or results.benchmark, tags=dict(tags or {})
    )
    run_id = run.info.run_id
    try:
        params = {"benchmark": results.benchmark, "aspects": ",".join(results.aspects), **(params or {})}
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), 0, 0) for key, value in sorted(results.flat_metrics().items())],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag("ultraflux.kind", "evaluation")],
        )
        client.log_artifacts(run_id, str(report_dir))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """Latest value of every metric of a run; ``EvalError`` when the run does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client_for(uri).get_run(run_id).data.metrics)
    except MlflowException as err:
        raise EvalError(f"MLflow run {run_id} not found at {uri}: {err.message}") from err


def compare_runs(uri: str, run_a: str, run_b: str) -> list[tuple[str, float | None, float | None]]:
    """``(metric, value in A, value in B)`` over the union of both runs' metric keys, sorted by key."""
    a, b = run_metrics(uri, run_a), run_metrics(uri, run_b)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))]
