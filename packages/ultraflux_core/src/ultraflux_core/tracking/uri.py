"""MLflow edge of the evaluation: one run per evaluation, metrics ``<metric>/<aspect>``, report artifacts,
and run-to-run comparison. Uses an explicit ``MlflowClient`` per call (no process-global tracking state)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from ultraflux_eval.config import TrackingConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.evaluate import EvalResults

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """``config.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite file (read at call time)."""
    return config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any heavy work, when the tracking store cannot be reached.

    http(s): a TCP connect to the server within ``timeout_s``. sqlite / file: the parent directory must exist
    (or be creatable). Raises ``EvalError`` naming the URI and what to change.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                return
        except OSError as err:
            raise EvalError(
                f"MLflow tracking server {uri} is unreachable ({err}); start it, or set eval.tracking.tracking_uri "
                f"(e.g. {DEFAULT_TRACKING_URI} for a local store)"
            ) from err
    if parsed.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is not None and str(path) not in ("", ":memory:"):
            try:
                path.resolve().parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise EvalError(f"cannot create the folder of the MLflow SQLite store {uri}: {err}") from err
        return
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path if parsed.scheme == "file" else uri)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EvalError(f"cannot create the MLflow file store {root}: {err}") from err


def client_for(uri: str):
    """An ``MlflowClient`` bound to ``uri`` (tracking and registry)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def local_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (``<db dir>/mlartifacts``), not into ``./mlruns``."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_location(uri))
    except Exception:  # another evaluation created it concurrently: read it back
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


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

    uri = resolve_tracking_uri(config)
    check_tracking_reachable(uri, config.connect_timeout_s)
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
