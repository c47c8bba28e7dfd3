"""``ultraflux worker``: Prefect's process worker, with a stop that takes no new flow run.

``prefect worker start`` (3.9) answers the first SIGTERM by sending itself a SIGINT and then goes on polling: it
claims flow runs while it is meant to stop, and the SIGKILL at the end of a pod's or unit's grace period leaves them
``Pending`` or ``Running`` for ever (measured on a loopback ``prefect server``: a run created one second after the
SIGTERM was claimed and started by the stopping worker). :class:`DrainingProcessWorker` is Prefect's
``ProcessWorker`` in everything else; :func:`serve` gives a stop signal this meaning: claim nothing more, let the
flow runs already claimed finish, exit 0. A second signal stops at once through Prefect's own teardown.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.workers.process import ProcessWorker
from ultraflux_core.errors import UltraFluxError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
IDLE_POLL_S = 0.5  # how often a stopping worker looks whether its last flow run has ended


class DrainingProcessWorker(ProcessWorker):
    """A process worker that, once :meth:`stop_claiming` is called, takes no new flow run.

    Serves pools of type ``process`` (``type``) but registers under its own dispatch key, so importing it does not
    replace Prefect's worker for ``prefect worker start --type process``.
    """

    type = "process"

    @classmethod
    def __dispatch_key__(cls) -> str:
        return "ultraflux-draining-process"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = False
        self._polls_in_flight = 0

    def stop_claiming(self) -> None:
        """From now on a poll claims nothing; a poll already under way finishes (its runs are then run)."""
        self.stopping = True

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        if self.stopping:
            return []
        self._polls_in_flight += 1
        try:
            return await super().get_and_submit_flow_runs()
        finally:
            self._polls_in_flight -= 1

    @property
    def idle(self) -> bool:
        """No poll under way and no claimed flow run unfinished (the limiter holds one token per claimed run,
        taken before Prefect proposes ``Pending`` and given back when the run has ended)."""
        return self._polls_in_flight == 0 and self.limiter.borrowed_tokens == 0


async def serve(pool: str, *, name: str | None = None, limit: int = 4, with_healthcheck: bool = False,
                printer: Callable[..., None] = print) -> None:
    """Run a draining process worker on ``pool`` until a stop signal, then until its claimed runs have ended."""
    if limit < 1:
        raise UltraFluxError(f"worker limit {limit}: at least one concurrent flow run is needed")
    worker = DrainingProcessWorker(work_pool_name=pool, name=name, limit=limit)
    loop = asyncio.get_running_loop()
    signals_seen = 0
    async with anyio.create_task_group() as group:

        def on_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                worker.stop_claiming()
                printer(f"Received {signal.Signals(signum).name}: claiming no new flow run; exiting when the "
                        f"{worker.limiter.borrowed_tokens} running one(s) end (signal again to stop at once)")
            else:
                printer(f"Received {signal.Signals(signum).name} again: stopping now")
                group.cancel_scope.cancel()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            group.start_soon(lambda: worker.start(with_healthcheck=with_healthcheck, printer=printer))
            while not (worker.stopping and worker.idle):
                await anyio.sleep(IDLE_POLL_S)
            group.cancel_scope.cancel()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
