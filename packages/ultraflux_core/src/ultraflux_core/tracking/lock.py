"""A mutex kept in the MLflow model registry (the store every promoter already shares), with expiry, renewal and
atomic breaking; promotions of one model serialise on it (``ultraflux_core.tracking.registry``).

The lock is a registered model ``<model>.promotion-lock`` whose tags hold the holder's ``token`` and ``expires``
(Unix time). Every step that decides ownership is one operation the registry's database makes atomic:

- **take**: ``create_registered_model`` — names are a unique key, so exactly one contender's insert succeeds.
- **break** a lock whose expiry passed (its holder died or stalled): ``rename_registered_model`` of the lock to
  ``<lock>.broken-<sha of the expired token>``. Two contenders that saw the same expired token race for one
  target name, which the unique key gives to one; the loser's rename fails and it simply tries to take the lock
  again. A contender whose view is stale (the token it saw was released and the lock retaken meanwhile) may
  rename the new holder's lock; it sees a token other than the one it meant to break and renames it back. The
  broken models stay as the record of who broke whose lock (one per dead holder).
- **renew**: while holding, a background thread moves ``expires`` forward every ``ttl_s / 3`` (only while the
  token is still its own), so a live promoter never loses the lock to the TTL, and a killed one frees it after
  ``ttl_s`` (waiters wait longer than that: ``PromotionConfig`` enforces it).
- **fence**: :meth:`RegistryLock.held` re-reads the lock; the promoter calls it right before it moves the alias and
  aborts when its token is gone or expired (a holder that stalled past its TTL: the renewal thread stalled too).

What MLflow 3 guarantees here (``SqlAlchemyStore``, used by a SQLite/Postgres/MySQL store directly and by ``mlflow
server`` behind its REST API): both calls run in one transaction on the ``registered_models`` row; a rename of a
name another transaction already renamed fails (row gone: ``RESOURCE_DOES_NOT_EXIST``, or a write conflict), and a
rename or create onto an existing name fails with ``RESOURCE_ALREADY_EXISTS``. Expiry compares wall clocks of
different hosts: keep them NTP-synchronised (a skew eats into ``ttl_s``).

``now`` is injectable and every step is a separate method, so tests replay every interleaving deterministically.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

LOCK_SUFFIX = ".promotion-lock"


class RegistryLock:
    """The promotion mutex of ``model_name`` in the registry behind ``client`` (see the module doc)."""

    def __init__(
        self, client, model_name: str, ttl_s: float, now: Callable[[], float] = time.time, renewing: bool = True
    ) -> None:
        """``renewing=False``: :meth:`start_renewing` does nothing (a holder whose process stalls, in tests)."""
        self.client, self.ttl_s, self.now, self.renewing = client, ttl_s, now, renewing
        self.name = model_name + LOCK_SUFFIX
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._stop: threading.Event | None = None

    def describe(self) -> str:
        return f"registered model {self.name!r}"

    def _read(self) -> tuple[str, float] | None:
        """``(token, expires)`` of the lock as stored now; None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            lock = self.client.get_registered_model(self.name)
        except MlflowException:
            return None
        tags = lock.tags or {}
        # tags are written with the create call; without them fall back to the store's creation time
        expires = float(tags.get("expires") or (lock.creation_timestamp or 0) / 1000 + self.ttl_s)
        return tags.get("token", f"an unknown promoter (created {lock.creation_timestamp})"), expires

    def try_acquire(self) -> bool:
        """One atomic attempt to take the lock."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name,
                tags={"token": self.token, "expires": f"{self.now() + self.ttl_s:.3f}"},
                description="promotion lock: held while the champion alias is compared and moved",
            )
            return True
        except MlflowException as err:
            # RESOURCE_DOES_NOT_EXIST too: on a name clash the SQL store re-reads the existing model, which its
            # holder may have released meanwhile (mlflow's SqlAlchemyStore.create_registered_model): still "busy"
            if not any(code in str(err.error_code) for code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")):
                raise
            return False

    def expired_holder(self) -> str | None:
        """The token of the current holder if its expiry has passed (it may be broken), else None."""
        state = self._read()
        return state[0] if state is not None and self.now() > state[1] else None

    def break_expired(self, token: str) -> bool:
        """Atomically take the lock away from ``token`` (seen expired by :meth:`expired_holder`); True if this call
        broke it. See the module doc for why a rename to a name derived from ``token`` is the atomic step."""
        return self._move_away(token, "broken")

    def _move_away(self, token: str, why: str) -> bool:
        """Rename the lock to ``<lock>.<why>-<sha of token>`` if it is ``token``'s; True if this call moved it."""
        from mlflow.exceptions import MlflowException

        target = f"{self.name}.{why}-{_digest(token)}"
        try:
            self.client.rename_registered_model(self.name, target)
        except MlflowException:
            return False  # another contender moved it first, or it was released
        if (self.client.get_registered_model(target).tags or {}).get("token") != token:
            try:  # a stale view: that was another holder's live lock; give it back
                self.client.rename_registered_model(target, self.name)
            except MlflowException:
                pass  # the name was retaken meanwhile: that holder's fence sees its token gone and aborts
            return False
        return True

    def held(self) -> bool:
        """The fence: whether the registry still names this holder's token, unexpired."""
        state = self._read()
        return state is not None and state[0] == self.token and self.now() <= state[1]

    def renew(self) -> bool:
        """Move the expiry ``ttl_s`` ahead if the lock is still this holder's; False once it is lost."""
        if not self.held():
            return False
        self.client.set_registered_model_tag(self.name, "expires", f"{self.now() + self.ttl_s:.3f}")
        return True

    def start_renewing(self) -> None:
        """Renew every ``ttl_s / 3`` in a daemon thread until :meth:`release` (or the lock is lost)."""
        if not self.renewing:
            return
        stop = self._stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - a failed renewal is retried; the fence decides in the end
                    continue

        threading.Thread(target=loop, name=f"renew {self.name}", daemon=True).start()

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still this holder's (moved away atomically, then deleted: a
        plain read-then-delete could delete the lock of whoever broke ours meanwhile)."""
        from mlflow.exceptions import MlflowException

        if self._stop is not None:
            self._stop.set()
        try:
            if self._move_away(self.token, "released"):
                self.client.delete_registered_model(f"{self.name}.released-{_digest(self.token)}")
        except MlflowException:
            pass  # already broken as expired: nothing of ours left to release


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]
