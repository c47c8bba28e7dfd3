"""Launching training ranks on this node with torchrun (multi-node runs use torchrun's c10d rendezvous from each
node's own launcher; see docs/training.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.training.distributed import free_port

# What a launcher sets for its ranks: a parent process's values (e.g. a flow running under torchrun) must not leak.
LAUNCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_command(nproc: int, program: Sequence[str]) -> list[str]:
    """The command that runs ``program`` (``["-m", module, args...]`` or a script and its args) on ``nproc`` ranks
    of this node, rendezvousing on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *program]


def launch_env() -> dict[str, str]:
    """This process's environment without any launcher variables (the launcher sets its own)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}


def run_ranks(nproc: int, program: Sequence[str], what: str) -> None:
    """Run ``program`` on ``nproc`` ranks and wait; ``UltraFluxError`` naming ``what`` when a rank fails."""
    proc = subprocess.run(torchrun_command(nproc, program), env=launch_env())
    if proc.returncode != 0:
        raise UltraFluxError(f"{what} failed on {nproc} ranks (exit {proc.returncode}); see the log above")
