"""The registry promotion lock under the attacks of a shared tracking server, against a real MLflow registry (the
SQLite ``SqlAlchemyStore`` that ``mlflow server`` runs behind its REST API; the server itself:
tests/flows/test_registry_server.py).

Contenders are :func:`promotion_steps` generators on one injected clock, driven step by step through every
interleaving (``itertools.permutations`` of their steps and of the stall), with no sleeps:

- a holder that stalls past its TTL after comparing, while a better contender breaks its lock and promotes;
- two contenders breaking the same expired lock of a dead holder;
- a holder SIGKILLed while holding (a real process) and a waiter whose clock has passed the TTL.

Invariants: only the lock's current holder ever moves the alias, at most one contender is inside its critical
section at any time, and the champion ends as the best of the versions whose promotion did not abort (an aborted
one raised and changed nothing).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import PromotionConfig
from ultraflux_core.tracking.lock import LOCK_SUFFIX, RegistryLock
from ultraflux_core.tracking.registry import PromotionDecision, promotion_steps, register_checkpoint
from ultraflux_core.tracking.uri import client_for

TTL = 60.0
START = 1_000_000.0  # the injected clock's epoch


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[str]:
    """A SQLite registry, on a RAM disk where there is one: the interleavings make hundreds of small commits."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="ultraflux-lock-", dir=shm))
    else:
        folder = tmp_path_factory.mktemp("mlflow")
    yield f"sqlite:///{folder}/mlflow.db"
    shutil.rmtree(folder, ignore_errors=True)


def _versions(uri: str, name: str, scores: dict[str, float]) -> dict[str, str]:
    """Register one version per score (its run logs ``score``); returns label -> version."""
    client = client_for(uri)
    experiment = client.get_experiment_by_name("lock") or client.get_experiment(client.create_experiment("lock"))
    out = {}
    for label, score in scores.items():
        run = client.create_run(experiment.experiment_id).info.run_id
        client.log_metric(run, "score", score)
        tags = {"git_sha": "x", "dvc_data_hash": "none", "config_hash": "0", "eval_run_id": run}
        out[label] = register_checkpoint(uri, name, f"/ckpt/{label}", tags)
    return out


def _lock_token(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return (client.get_registered_model(name + LOCK_SUFFIX).tags or {}).get("token")
    except MlflowException:
        return None


def _drive(
    schedule, contenders: dict[str, tuple], clock: Clock, client, name: str, exclusive: bool = True
) -> dict[str, object]:
    """Run ``schedule`` (contender labels, ``"stall"`` = the clock jumps past the TTL), then the rest round-robin.

    Checks after every step: a contender that moved the alias holds the lock in the registry right then, and (with
    ``exclusive``: nobody stalls past the TTL) at most one contender is between taking the lock and finishing.
    Returns label -> decision or raised error.
    """
    results: dict[str, object] = {}
    inside: set[str] = set()

    def step(label: str) -> None:
        steps, lock = contenders[label]
        try:
            event = next(steps)
        except StopIteration as done:
            results[label] = done.value
        except UltraFluxError as err:
            results[label] = err
        else:
            if event == "locked":
                inside.add(label)
            if event == "moved":
                assert _lock_token(client, name) == lock.token, f"{label} moved the alias without holding the lock"
            assert not exclusive or len(inside) <= 1, f"{sorted(inside)} hold the lock together"
            return
        inside.discard(label)

    for label in schedule:
        if label == "stall":
            clock.t += TTL + 1
        elif label not in results:
            step(label)
    while len(results) < len(contenders):
        for label in contenders:
            if label not in results:
                step(label)
    return results


def _check_outcome(
    client,
    name: str,
    results: dict[str, object],
    versions: dict[str, str],
    scores: dict[str, float],
    initial: str | None,
) -> None:
    """The champion is the best of the initial one and every contender that did not abort; aborts say why."""
    survivors = [label for label, r in results.items() if isinstance(r, PromotionDecision)]
    for result in results.values():
        if not isinstance(result, PromotionDecision):
            assert "lost its lock" in str(result), result
    best = max([*survivors, *([initial] if initial else [])], key=scores.get)
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[best]


def _schedules(*tokens: str) -> list[tuple[str, ...]]:
    return sorted(set(itertools.permutations(tokens)))


def test_stalled_holder_never_overwrites_a_better_champion(store):
    """The reported attack: A (0.92) takes the lock and compares against the champion (0.90), stalls past the TTL;
    B (0.95) breaks the expired lock and promotes; A wakes up. In every interleaving of A's and B's steps and the
    stall, only the lock's holder moves the alias and the champion ends on the best survivor."""
    uri, name = store, "stalled"
    client = client_for(uri)
    scores = {"old": 0.90, "A": 0.92, "B": 0.95}
    versions = _versions(uri, name, scores)
    rule = PromotionConfig(model_name=name, metric="score", lock_ttl_s=TTL, lock_wait_s=10 * TTL)
    schedules = _schedules("A", "A", "B", "B", "stall")
    for schedule in schedules:
        client.set_registered_model_alias(name, "champion", versions["old"])
        clock = Clock()
        contenders = {}
        for label in ("A", "B"):
            lock = RegistryLock(client, name, TTL, clock, renewing=False)  # a stalled process renews nothing
            contenders[label] = (promotion_steps(client, versions[label], rule, lock), lock)
        results = _drive(schedule, contenders, clock, client, name, exclusive=False)
        _check_outcome(client, name, results, versions, scores, "old")
        assert any(isinstance(r, PromotionDecision) and r.promoted for r in results.values()), (schedule, results)
        assert _lock_token(client, name) is None  # released (or broken) whatever happened
    assert len(schedules) == 30


def test_two_breakers_of_a_dead_holders_lock_never_both_hold_it(store):
    """A promoter died holding the lock (expired). B and C both see it expired and break it: in every
    interleaving exactly one breaks it, the two never hold the lock together, and the champion is the best."""
    uri, name = store, "breakers"
    client = client_for(uri)
    scores = {"old": 0.90, "B": 0.95, "C": 0.93}
    versions = _versions(uri, name, scores)
    rule = PromotionConfig(model_name=name, metric="score", lock_ttl_s=TTL, lock_wait_s=10 * TTL)
    schedules = _schedules("B", "B", "C", "C")  # each: sees the lock expired, breaks it (and takes it)
    for i, schedule in enumerate(schedules):
        client.set_registered_model_alias(name, "champion", versions["old"])
        clock = Clock()
        dead = f"dead:{i}:x"
        client.create_registered_model(name + LOCK_SUFFIX, tags={"token": dead, "expires": f"{START - 1}"})
        contenders = {}
        for label in ("B", "C"):
            lock = RegistryLock(client, name, TTL, clock, renewing=False)
            contenders[label] = (promotion_steps(client, versions[label], rule, lock), lock)
        results = _drive(schedule, contenders, clock, client, name)
        assert all(isinstance(r, PromotionDecision) for r in results.values()), (schedule, results)
        _check_outcome(client, name, results, versions, scores, "old")
        broken = client.search_registered_models(f"name LIKE '{name}{LOCK_SUFFIX}.broken-%'")
        assert [m.tags["token"] for m in broken].count(dead) == 1, schedule  # the dead holder's lock, broken once
        assert _lock_token(client, name) is None  # released
    assert len(schedules) == 6


def test_a_stale_breaker_gives_a_live_lock_back(store):
    """C saw holder X's lock expired, but X released it and B took it before C's rename: C must not keep B's lock."""
    uri, name = store, "stale-view"
    client = client_for(uri)
    clock = Clock()
    x, b, c = (RegistryLock(client, name, TTL, clock, renewing=False) for _ in range(3))
    assert x.try_acquire()
    clock.t += TTL + 1
    seen = c.expired_holder()
    assert seen == x.token
    x.release()
    assert b.try_acquire()
    assert not c.break_expired(seen)
    assert b.held() and _lock_token(client, name) == b.token


def test_renewal_keeps_a_live_holder_and_only_its_own_lock(store):
    uri, name = store, "renewal"
    client = client_for(uri)
    clock = Clock()
    a, b = (RegistryLock(client, name, TTL, clock, renewing=False) for _ in range(2))
    assert a.try_acquire()
    for _ in range(5):  # a slow promotion that renews: never expired
        clock.t += 0.6 * TTL
        assert a.renew()
        assert b.expired_holder() is None and not b.try_acquire()
    clock.t += TTL + 1  # renewals stop (the holder stalled): breakable
    assert b.break_expired(b.expired_holder()) and b.try_acquire()
    assert not a.renew() and not a.held()  # a renewal never writes onto the new holder's lock
    assert b.held()
    b.release()
    assert _lock_token(client, name) is None


def test_renewal_thread_moves_the_expiry_forward(store):
    uri, name = store, "renewal-thread"
    client = client_for(uri)
    lock = RegistryLock(client, name, ttl_s=0.6)  # the real clock: renewed every 0.2 s
    assert lock.try_acquire()
    first = float(client.get_registered_model(lock.name).tags["expires"])
    lock.start_renewing()
    try:
        deadline = time.monotonic() + 60  # a bounded wait for the thread, not a speed assertion
        while float(client.get_registered_model(lock.name).tags["expires"]) <= first:
            assert time.monotonic() < deadline, "the renewal thread never renewed"
            time.sleep(0.1)
    finally:
        lock.release()
    assert _lock_token(client, name) is None


HOLDER = """
import sys, time
from ultraflux_core.tracking.lock import RegistryLock
from ultraflux_core.tracking.uri import client_for
lock = RegistryLock(client_for(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
assert lock.try_acquire()
lock.start_renewing()
print("held", flush=True)
time.sleep(600)  # killed long before
"""


def test_killed_holder_blocks_only_until_its_ttl(store):
    """A promoter SIGKILLed while holding the lock (no release, no renewal): a waiter is refused while the lock is
    within its TTL, and takes it over once the TTL has passed (its clock moved past it), then promotes."""
    from tests.servers import REPO_PATH

    uri, name = store, "killed"
    client = client_for(uri)
    versions = _versions(uri, name, {"new": 0.5})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, name, str(TTL)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO_PATH},
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held", "the holder never took the lock"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    dead = _lock_token(client, name)
    assert dead is not None and f":{holder.pid}:" in dead
    now = time.time()
    within = RegistryLock(client, name, TTL, lambda: now + TTL / 2, renewing=False)
    assert within.expired_holder() is None and not within.try_acquire()  # a waiter before the TTL ran out ...
    rule = PromotionConfig(model_name=name, metric="score", lock_ttl_s=TTL, lock_wait_s=2 * TTL)
    after = RegistryLock(client, name, TTL, lambda: now + TTL + 1, renewing=False)
    steps = promotion_steps(client, versions["new"], rule, after)
    events = []
    with pytest.raises(StopIteration) as done:
        while True:
            events.append(next(steps))
    assert events[0] == "expired" and done.value.value.promoted  # ... and one after it breaks the dead lock
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions["new"]
    assert _lock_token(client, name) is None


def test_waiters_must_outlast_the_lock_ttl():
    with pytest.raises(ValidationError, match="must exceed lock_ttl_s"):
        PromotionConfig(lock_ttl_s=600, lock_wait_s=120)
    rule = PromotionConfig()
    assert rule.lock_wait_s > rule.lock_ttl_s
