"""Stopping generation from outside the sampling loop: a process-wide flag that
:func:`ultraflux_model.inference.pipeline.generate` checks after every denoising step, set by a SIGTERM handler
that long-running servers install (the served pyfunc model does, in ``load_context``).

Why a flag and not the signal's default action: under ``mlflow models serve`` uvicorn owns SIGTERM and shuts down
gracefully, i.e. it waits for the request in flight, and a 4K request of many steps kept the worker computing long
after SIGTERM. Chaining our handler in front of uvicorn's makes that request end at its next step, after which
uvicorn's own shutdown (and its re-raise of the signal) proceeds as usual.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from ultraflux_core.errors import UltraFluxError

STOP = threading.Event()


class Stopped(UltraFluxError):
    """Generation was stopped between two steps because the process is shutting down."""


def check_stop(done: int, total: int) -> None:
    """Raise :class:`Stopped` (naming the step reached) once :data:`STOP` is set."""
    if STOP.is_set():
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

    def handler(signum: int, frame: FrameType | None) -> None:
        STOP.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    handler.sets_ultraflux_stop = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, handler)
    return True
