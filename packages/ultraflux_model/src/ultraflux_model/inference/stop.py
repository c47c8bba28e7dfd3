"""Stopping generation from outside the sampling loop: a process-wide flag that
:func:`ultraflux_model.inference.pipeline.generate` checks after every denoising step, set by a SIGTERM handler
that long-running servers install (the served pyfunc model does, in ``load_context``).

Why a flag and not the signal's default action: under ``mlflow models serve`` uvicorn owns SIGTERM and shuts down
gracefully, i.e. it waits for the request in flight, and a 4K request of many steps kept the worker computing long
after SIGTERM. The request must end at its next step, after which uvicorn's own shutdown (and its re-raise of the
signal) proceeds as usual. Two ways in, because uvicorn installs its handler at a different moment depending on how
it is started: a handler of ours chained in front of one installed earlier (:func:`stop_on_sigterm`), and, when
uvicorn's handler came after ours (a single worker imports the app, i.e. loads the model, before it takes the
signals), the shutdown request that handler recorded on its server (``should_exit``).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from ultraflux_core.errors import UltraFluxError

STOP = threading.Event()


class Stopped(UltraFluxError):
    """Generation was stopped between two steps because the process is shutting down."""


class Cancelled(UltraFluxError):
    """Generation was stopped between two steps because its request was cancelled or its client went away (a
    server's per-request flag, checked through ``generate``'s step callback: the replica is free at the next step)."""


def stop_requested() -> bool:
    """True once :data:`STOP` is set or the server that owns SIGTERM (uvicorn) has been asked to shut down."""
    if STOP.is_set():
        return True
    # uvicorn's SIGTERM/SIGINT handler is its Server's bound ``handle_exit``, which sets ``should_exit``.
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return getattr(server, "should_exit", False) is True


def check_stop(done: int, total: int) -> None:
    """Raise :class:`Stopped` (naming the step reached) once :func:`stop_requested`."""
    if stop_requested():
        raise Stopped(f"generation stopped after step {done} of {total}: the server is shutting down (SIGTERM)")


def stop_on_sigterm() -> bool:
    """Install a SIGTERM handler that sets :data:`STOP`, then does what the replaced handler did.

    The replaced handler still runs: a callable one (uvicorn's graceful shutdown) is called; the default action
    (terminate) is restored and the signal re-raised, so a plain process dies exactly as before. Only the main thread
    may install signal handlers: elsewhere this does nothing and returns False. Installing twice is harmless.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "sets_ultraflux_stop", False):
        return True

    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child (a pool or DataLoader worker) inherited us: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        STOP.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    handler.sets_ultraflux_stop = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, handler)
    return True
