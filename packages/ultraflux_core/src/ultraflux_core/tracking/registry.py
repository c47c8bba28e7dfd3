"""MLflow model registry: register an evaluated release, move the ``champion`` alias by the configured rule.

Concurrency: two evaluations finishing together must not leave the alias on the worse model. Promotion is a
compare-then-set done under a mutex, and verified after setting (the alias is read back; if it moved, the
comparison is redone against the new holder).

The mutex lives where the registry lives:

- tracking **server** (``http(s)://``): the registry itself (``ultraflux_core.tracking.lock.RegistryLock``: a
  registered model taken by an atomic create, renewed while held, broken atomically once expired). Right before it
  moves the alias, the promoter re-reads the lock and aborts when its token is gone (fencing): a holder that
  stalled past the TTL cannot overwrite the champion that a later holder set.
- local store (``sqlite:///``, files): an exclusive lock file (``promotion.lock_path``, default beside the
  SQLite file); the kernel frees it when its holder dies.

Promotion is written as steps (:func:`promotion_steps`, a generator) so that tests can replay every interleaving
of contenders; :func:`promote_if_better` drives the steps, pausing while the lock is busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import PromotionConfig
from ultraflux_core.tracking.lock import RegistryLock
from ultraflux_core.tracking.uri import client_for, logged_model_id

TAG_KEYS = ("git_sha", "dvc_data_hash", "config_hash", "eval_run_id")
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


def register_checkpoint(uri: str, model_name: str, source: str, tags: dict[str, str], description: str = "") -> str:
    """Create a model version for the model at ``source`` (a logged model ``models:/<model_id>``, or any model
    URI); returns its version.

    ``tags`` must hold ``git_sha``, ``dvc_data_hash``, ``config_hash`` and ``eval_run_id``; the version is linked
    to the evaluation run (and to the logged model, for a ``models:/<model_id>`` source).
    """
    from mlflow.exceptions import MlflowException

    missing = [k for k in TAG_KEYS if not tags.get(k)]
    if missing:
        raise UltraFluxError(f"registering {source} needs tags {missing}")
    client = client_for(uri)
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    model_id = logged_model_id(source)
    if model_id is not None:
        # the logged model's storage location, resolved here: MLflow's SQL registry would resolve a
        # ``models:/<model_id>`` source against the process-global tracking URI, not this client's
        source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(model_name, source=str(source), run_id=tags["eval_run_id"], tags=tags,
                                          model_id=model_id, description=description or None)
    return str(version.version)


def champion_scores(uri: str, rule: PromotionConfig) -> tuple[str, dict[str, float]] | None:
    """``("v<N>", metrics of its latest evaluation run)`` for the version holding ``rule.alias``, or ``None`` when
    there is no registry entry or no champion yet (the report's champion column)."""
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    holder = _alias_holder(client, rule.model_name, rule.alias)
    if holder is None:
        return None
    try:
        info = client.get_model_version(rule.model_name, holder)
        run_id = (info.tags or {}).get("eval_run_id") or info.run_id
        return f"v{holder}", dict(client.get_run(run_id).data.metrics)
    except MlflowException:
        return None


def version_description(changes: str, scores: dict[str, float], tags: dict[str, str], backbones: str) -> str:
    """A registered version's description: what changed, its overall scores, and its lineage."""
    overall = ", ".join(f"{k.removesuffix('/overall')} {v:.4g}" for k, v in sorted(scores.items())
                        if k.endswith("/overall") and not k.startswith("n_images"))  # fmt: skip
    note = " (tiny random backbones: not comparable with real scores)" if backbones == "tiny" else ""
    return (
        f"{changes}\n\nScores (overall, {backbones} backbones{note}): {overall or 'none'}\n\n"
        f"Lineage: git {tags.get('git_sha', '?')}, data {tags.get('dvc_data_hash', '?')}, "
        f"config {tags.get('config_hash', '?')[:16]}, evaluation run {tags.get('eval_run_id', '?')}"
    )










def record_evaluation(uri: str, model_name: str, version: str, run_id: str) -> None:
    """Point an existing version at a newer evaluation run (a scheduled re-evaluation); promotion then compares
    that run's metrics."""
    client_for(uri).set_model_version_tag(model_name, version, "eval_run_id", run_id)




def _metric_of(client, model_name: str, version: str, metric: str) -> float:
    """The metric from the version's latest evaluation run (tag ``eval_run_id``, else the linked run)."""
    info = client.get_model_version(model_name, version)
    run_id = (info.tags or {}).get("eval_run_id") or info.run_id
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        raise UltraFluxError(f"model version {model_name}/{version} (run {run_id}) has no metric {metric!r} to compare")
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


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class FileMutex:
    """The promotion mutex of a local store: an exclusive lock file, with :class:`RegistryLock`'s steps (the kernel
    frees it when its holder dies, so nothing ever expires, and holding it cannot be lost)."""

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock, self.now, self.token = FileLock(str(path)), now, str(path)

    def describe(self) -> str:
        return f"lock file {self.lock.lock_file}"

    def try_acquire(self) -> bool:
        try:
            self.lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def expired_holder(self) -> str | None:
        return None

    def break_expired(self, token: str) -> bool:
        return False

    def held(self) -> bool:
        return self.lock.is_locked

    def start_renewing(self) -> None:
        pass

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release()


def promotion_mutex(uri: str, rule: PromotionConfig, now: Callable[[], float] = time.time) -> RegistryLock | FileMutex:
    """The mutex promotions of ``rule.model_name`` at ``uri`` share: the registry's for a server, else a file."""
    if is_server_uri(uri):
        return RegistryLock(client_for(uri), rule.model_name, rule.lock_ttl_s, now)
    return FileMutex(rule.lock_path or default_lock_path(uri, rule.model_name), now)


Steps = Generator[str, None, PromotionDecision]


def acquire_steps(lock: RegistryLock | FileMutex, wait_s: float) -> Generator[str, None, None]:
    """Take ``lock``: one attempt per step (``"busy"`` after a failed one), breaking it when its holder expired;
    ``UltraFluxError`` naming the holder after ``wait_s`` (on the lock's clock)."""
    deadline = lock.now() + wait_s
    while not lock.try_acquire():
        expired = lock.expired_holder()
        if expired is not None:
            yield "expired"  # between seeing it expired and breaking it: where two breakers interleave
            lock.break_expired(expired)
            continue
        if lock.now() > deadline:
            raise UltraFluxError(
                f"promotion lock ({lock.describe()}) is still held after {wait_s:.0f}s; retry later (a dead "
                "holder's lock expires after promotion.lock_ttl_s)"
            )
        yield "busy"
    yield "locked"


def promotion_steps(client, version: str, rule: PromotionConfig, lock: RegistryLock | FileMutex) -> Steps:
    """Move ``rule.alias`` to ``version`` if it beats the current holder, as steps (each yield is a point where
    another promoter may act); returns the decision. Takes ``lock`` first, releases it last."""
    candidate = _metric_of(client, rule.model_name, version, rule.metric)
    yield from acquire_steps(lock, rule.lock_wait_s)
    lock.start_renewing()
    try:
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
            yield "compared"
            if not lock.held():  # fencing: stalled past the TTL, another promoter may have acted since
                raise UltraFluxError(
                    f"promotion of {rule.model_name} v{version} lost its lock ({lock.describe()}) before moving "
                    f"{rule.alias!r} (stalled past promotion.lock_ttl_s?); nothing was changed, retry"
                )
            client.set_registered_model_alias(rule.model_name, rule.alias, version)
            yield "moved"
            if _alias_holder(client, rule.model_name, rule.alias) == version:
                reason = "no champion yet" if holder is None else f"beats v{holder} ({champion:.6g})"
                return PromotionDecision(True, version, holder, candidate, champion, reason)
    finally:
        lock.release()
    raise UltraFluxError(f"alias {rule.alias!r} of {rule.model_name} kept moving during promotion of v{version}; retry")


def promote_if_better(uri: str, version: str, rule: PromotionConfig) -> PromotionDecision:
    """Move ``rule.alias`` to ``version`` if it beats the current holder on ``rule.metric`` (or there is none)."""
    steps = promotion_steps(client_for(uri), version, rule, promotion_mutex(uri, rule))
    pause = 0.05
    try:
        while True:
            if next(steps) == "busy":
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
    except StopIteration as done:
        return done.value
