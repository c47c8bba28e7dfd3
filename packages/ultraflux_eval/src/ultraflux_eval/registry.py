"""MLflow model registry: register an evaluated checkpoint, move the ``champion`` alias by the configured rule.

Concurrency: two evaluations finishing together must not leave the alias on the worse model. Promotion is a
compare-then-set done under an exclusive lock file (``promotion.lock_path``; by default beside a SQLite store),
and verified after setting: the alias is read back and, if another writer moved it in between (e.g. a process
on another host that does not share the lock), the comparison is redone against the new holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ultraflux_eval.config import PromotionConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.lineage import config_hash, dvc_data_hash, git_sha  # noqa: F401  (re-exported for callers)
from ultraflux_eval.tracking import client_for

TAG_KEYS = ("git_sha", "dvc_data_hash", "config_hash", "eval_run_id")
LOCK_TIMEOUT_S = 120.0
VERIFY_ROUNDS = 5


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    version: str
    previous_champion: str | None
    candidate_value: float
    champion_value: float | None
    reason: str


def default_lock_path(uri: str, model_name: str) -> Path:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + f".{model_name}.promote.lock")
    return Path.home() / ".ultraflux" / f"registry-{model_name}.lock"


def register_checkpoint(uri: str, model_name: str, source: str, tags: dict[str, str]) -> str:
    """Create a model version for the checkpoint at ``source`` (path or URI, not copied); returns its version.

    ``tags`` must hold ``git_sha``, ``dvc_data_hash``, ``config_hash`` and ``eval_run_id``; the version is linked
    to the evaluation run.
    """
    from mlflow.exceptions import MlflowException

    missing = [k for k in TAG_KEYS if not tags.get(k)]
    if missing:
        raise EvalError(f"registering {source} needs tags {missing}")
    client = client_for(uri)
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = client.create_model_version(model_name, source=str(source), run_id=tags["eval_run_id"], tags=tags)
    return str(version.version)


def record_evaluation(uri: str, model_name: str, version: str, run_id: str) -> None:
    """Point an existing version at a newer evaluation run (a scheduled re-evaluation); promotion then compares
    that run's metrics."""
    client_for(uri).set_model_version_tag(model_name, version, "eval_run_id", run_id)


def latest_version(uri: str, model_name: str) -> tuple[str, str]:
    """``(version, source)`` of the highest registered version of ``model_name``; ``EvalError`` if none."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client_for(uri).search_model_versions(f"name='{model_name}'")
    except MlflowException as err:
        raise EvalError(f"cannot list versions of {model_name} at {uri}: {err.message}") from err
    if not versions:
        raise EvalError(f"no registered versions of {model_name!r} at {uri}: register one (eval flow with model=...)")
    newest = max(versions, key=lambda v: int(v.version))
    return str(newest.version), str(newest.source)


def _metric_of(client, model_name: str, version: str, metric: str) -> float:
    """The metric from the version's latest evaluation run (tag ``eval_run_id``, else the linked run)."""
    info = client.get_model_version(model_name, version)
    run_id = (info.tags or {}).get("eval_run_id") or info.run_id
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        raise EvalError(f"model version {model_name}/{version} (run {run_id}) has no metric {metric!r} to compare")
    return float(metrics[metric])


def _alias_holder(client, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def beats(candidate: float, champion: float, rule: PromotionConfig) -> bool:
    """The configured rule: strictly better by more than ``min_delta`` in the configured direction."""
    delta = candidate - champion if rule.higher_is_better else champion - candidate
    return delta > rule.min_delta


def promote_if_better(uri: str, version: str, rule: PromotionConfig) -> PromotionDecision:
    """Move ``rule.alias`` to ``version`` if it beats the current holder on ``rule.metric`` (or there is none)."""
    client = client_for(uri)
    lock_path = rule.lock_path or default_lock_path(uri, rule.model_name)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    candidate = _metric_of(client, rule.model_name, version, rule.metric)
    try:
        with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
            for _ in range(VERIFY_ROUNDS):
                holder = _alias_holder(client, rule.model_name, rule.alias)
                if holder == version:
                    return PromotionDecision(True, version, None, candidate, candidate, "already the champion")
                champion = None if holder is None else _metric_of(client, rule.model_name, holder, rule.metric)
                if champion is not None and not beats(candidate, champion, rule):
                    return PromotionDecision(
                        False, version, holder, candidate, champion,
                        f"{rule.metric} {candidate:.6g} does not beat champion v{holder} ({champion:.6g}) "
                        f"by > {rule.min_delta}",
                    )
                client.set_registered_model_alias(rule.model_name, rule.alias, version)
                if _alias_holder(client, rule.model_name, rule.alias) == version:
                    reason = "no champion yet" if holder is None else f"beats v{holder} ({champion:.6g})"
                    return PromotionDecision(True, version, holder, candidate, champion, reason)
    except Timeout as err:
        raise EvalError(f"could not take the promotion lock {lock_path} within {LOCK_TIMEOUT_S}s") from err
    raise EvalError(f"alias {rule.alias!r} of {rule.model_name} kept moving during promotion of v{version}; retry")
