"""`ultraflux worker start` against a real `prefect server`: after a SIGTERM the worker claims no new flow run,
the run it was executing completes, the worker exits 0, and a run created after the signal is still Scheduled for
the next worker (Prefect's own `prefect worker start` claimed and started such a run: docs/deploy.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

POOL = "drain-test"
WAIT_S = 240  # bound on every wait (a loaded 2-core machine starts a flow run in ~10 s)

FLOW_SOURCE = '''
import time
from prefect import flow

@flow
def sleeper(seconds: float) -> None:
    time.sleep(seconds)
'''


async def _state(run_id) -> StateType:
    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state.type


def _wait_for(what: str, predicate, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


@pytest.mark.slow
def test_stopping_worker_claims_no_new_run_and_finishes_the_running_one(tmp_path: Path, prefect_server):
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "sleeper.py").write_text(FLOW_SOURCE)
    env = prefect_server
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=300)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        deployment_id = flow.from_source(source=str(tmp_path / "flows"), entrypoint="sleeper.py:sleeper").deploy(
            name="sleeper", work_pool_name=POOL, print_next_steps=False)

        async def create_run(seconds: float):
            async with get_client() as client:
                return (await client.create_flow_run_from_deployment(deployment_id,
                                                                     parameters={"seconds": seconds})).id

        log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
        worker = subprocess.Popen([sys.executable, "-m", "ultraflux.cli", "worker", "start", "--pool", POOL,
                                   "--limit", "2"], env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            running = asyncio.run(create_run(20))
            _wait_for("the first run to start", lambda: asyncio.run(_state(running)) == StateType.RUNNING)
            worker.send_signal(signal.SIGTERM)
            time.sleep(2)  # the signal has been handled: what is created now arrives at a stopping worker
            late = asyncio.run(create_run(0))
            time.sleep(5)  # five polls of the worker (PREFECT_WORKER_QUERY_SECONDS=1)
            assert asyncio.run(_state(late)) == StateType.SCHEDULED
            rc = worker.wait(timeout=WAIT_S)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            log.close()
        output = (tmp_path / "worker.log").read_text(errors="replace")
        assert rc == 0, output[-3000:]
        assert "claiming no new flow run" in output, output[-3000:]
        assert asyncio.run(_state(running)) == StateType.COMPLETED, output[-3000:]
        # the run that arrived during the stop was never claimed: the next worker takes it
        assert asyncio.run(_state(late)) == StateType.SCHEDULED, output[-3000:]
