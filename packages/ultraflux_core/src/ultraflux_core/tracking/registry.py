"""MLflow model registry: register an evaluated release, move the ``champion`` alias by the configured rule.

Concurrency: two evaluations finishing together must not leave the alias on the worse model. Promotion is a
compare-then-set done under a mutex, and verified after setting (the alias is read back; if it moved, the
comparison is redone against the new holder).

The mutex lives where the registry lives:

- tracking **server** (``http(s)://``): the server itself. Hosts share nothing else, so a lock file would
  serialise only promotions on one machine. MLflow has no compare-and-set on tags, and "write a token tag, read
  it back" is not a mutex (two writers can each read back their own token if their writes and reads
  interleave). Registered-model names, however, are a unique key of the server's database:
  ``create_registered_model("<model>.promotion-lock")`` succeeds for exactly one caller and fails with
  ``RESOURCE_ALREADY_EXISTS`` for everyone else — an atomic insert-if-absent, i.e. a compare-and-set on
  "no lock". The holder writes a token and an expiry as tags and deletes the lock model when done (after
  reading back that the token is still its own); a lock whose expiry has passed (its holder died) is deleted by
  the next contender (breaking a dead holder's lock is the one step that is not atomic; it happens only after
  a promoter died holding it).
- local store (``sqlite:///``, files): an exclusive lock file (``promotion.lock_path``, default beside the
  SQLite file), as before.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import PromotionConfig
from ultraflux_core.tracking.uri import client_for, logged_model_id

TAG_KEYS = ("git_sha", "dvc_data_hash", "config_hash", "eval_run_id")
LOCK_TIMEOUT_S = 120.0
LOCK_TTL_S = 600.0  # a promotion takes seconds; a lock older than this belongs to a dead promoter
VERIFY_ROUNDS = 5
LOCK_SUFFIX = ".promotion-lock"


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
                                          model_id=model_id)
    return str(version.version)










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


@contextmanager
def server_promotion_lock(uri: str, model_name: str, timeout_s: float = LOCK_TIMEOUT_S,
                          ttl_s: float = LOCK_TTL_S) -> Iterator[str]:
    """Hold the tracking server's promotion mutex for ``model_name`` (see the module doc); yields the token.

    Waits up to ``timeout_s`` (polling with growing pauses), breaks a lock whose expiry has passed, and raises
    ``UltraFluxError`` on timeout naming the holder.
    """
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    lock_name = model_name + LOCK_SUFFIX
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    deadline, pause, holder = time.monotonic() + timeout_s, 0.05, "?"
    while True:
        try:
            client.create_registered_model(
                lock_name, tags={"token": token, "expires": f"{time.time() + ttl_s:.3f}"},
                description=f"promotion lock of {model_name}: held while the champion alias is compared and moved",
            )
            break
        except MlflowException as err:
            # RESOURCE_DOES_NOT_EXIST too: on a name clash the SQL store re-reads the existing model, which its
            # holder may have deleted meanwhile (mlflow's SqlAlchemyStore.create_registered_model) — still "busy"
            if not any(code in str(err.error_code) for code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")):
                raise
        holder = _break_if_expired(client, lock_name, ttl_s)
        if time.monotonic() > deadline:
            raise UltraFluxError(
                f"promotion lock {lock_name!r} at {uri} is held by {holder} for more than {timeout_s:.0f}s; retry "
                f"later, or delete registered model {lock_name!r} if that promoter is gone"
            )
        time.sleep(pause)
        pause = min(pause * 2, 2.0)
    try:
        yield token
    finally:
        _release(client, lock_name, token)


def _break_if_expired(client, lock_name: str, ttl_s: float) -> str:
    """Delete the lock if its holder's expiry passed; returns who holds it (for messages)."""
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(lock_name)
    except MlflowException:
        return "nobody (released meanwhile)"
    tags = lock.tags or {}
    # tags are written with the create call; without them fall back to the server's creation time
    expires = float(tags.get("expires") or (lock.creation_timestamp or 0) / 1000 + ttl_s)
    if time.time() > expires:
        try:
            client.delete_registered_model(lock_name)
        except MlflowException:
            pass  # another contender broke it first
    return tags.get("token", "an unknown promoter")


def _release(client, lock_name: str, token: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if (client.get_registered_model(lock_name).tags or {}).get("token") == token:
            client.delete_registered_model(lock_name)
    except MlflowException:
        pass  # already broken as expired: nothing of ours left to release


@contextmanager
def promotion_lock(uri: str, rule: PromotionConfig) -> Iterator[None]:
    """The mutex promotions of ``rule.model_name`` at ``uri`` share: the server's for a server URI, else a file."""
    if is_server_uri(uri):
        with server_promotion_lock(uri, rule.model_name):
            yield
        return
    lock_path = rule.lock_path or default_lock_path(uri, rule.model_name)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout as err:
        raise UltraFluxError(f"could not take the promotion lock {lock_path} within {LOCK_TIMEOUT_S}s") from err


def promote_if_better(uri: str, version: str, rule: PromotionConfig) -> PromotionDecision:
    """Move ``rule.alias`` to ``version`` if it beats the current holder on ``rule.metric`` (or there is none)."""
    client = client_for(uri)
    candidate = _metric_of(client, rule.model_name, version, rule.metric)
    with promotion_lock(uri, rule):
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
    raise UltraFluxError(f"alias {rule.alias!r} of {rule.model_name} kept moving during promotion of v{version}; retry")
