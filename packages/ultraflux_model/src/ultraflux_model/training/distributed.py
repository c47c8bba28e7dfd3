"""Process-group set-up for DeepSpeed: launched by ``deepspeed``/``torchrun`` or as one plain process.

Launchers export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; a plain
``ultraflux train`` gets a one-rank group on a free loopback port, so the same ZeRO code path runs
everywhere. On CPU the backend is gloo and the precision fp32; on CUDA nccl and bf16.
"""

from __future__ import annotations

import atexit
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import DeepSpeedConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that nothing listens on right now (loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(cfg: DeepSpeedConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def use_bf16(cfg: DeepSpeedConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available()
    return cfg.precision == "bf16"


def _launched() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(cfg: DeepSpeedConfig) -> DistInfo:
    """Initialise (once per process) the torch/DeepSpeed process group and return this rank's place in it."""
    # DeepSpeed JIT-builds C++ ops into TORCH_EXTENSIONS_DIR; a fixed folder builds them once per machine.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cfg.torch_extensions_dir.expanduser()))
    import deepspeed
    import deepspeed.ops

    cuda = torch.cuda.is_available()
    if not cuda and not cfg.cpu_shm_comm_op:
        # The CPU backend compiles its shared-memory all-reduce op (45-75 s) on every first init; only
        # DeepSpeed's tensor-parallel inference path (inference_all_reduce) uses it, never ZeRO training.
        # DeepSpeed consults this table before building the op and keeps edits to it (deepspeed/ops/__init__.py).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = backend_for(cfg)
    if backend == "nccl" and not cuda:
        raise UltraFluxError("train.deepspeed.backend=nccl needs CUDA; use gloo (or auto) on a CPU machine")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the group exists, so nccl binds each rank to its own GPU
    if _launched():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        # One plain process: a one-rank group on a free loopback port, passed explicitly rather than through
        # RANK/MASTER_PORT environment variables that child processes (launchers, flows) would inherit.
        # DeepSpeed's engine insists on LOCAL_RANK alone; children ignore it without RANK/WORLD_SIZE.
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0, world_size=1,
        )
    atexit.register(_leave_group)  # a second registration (a second init in one process) finds no group: harmless
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _leave_group() -> None:
    """Tear the process group down before the interpreter's own finalisation does. Left to it, a gloo group's
    threads can be destroyed still joinable and abort a rank that has finished all its work ("terminate called
    without an active exception", SIGABRT: seen once on the two-rank ZeRO-3 load test)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce sum of a CPU tensor (a copy; the input is untouched). Goes through the device for nccl."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value.detach().clone()
    out = value.detach().to(torch.device("cuda") if torch.distributed.get_backend() == "nccl" else "cpu", copy=True)
    torch.distributed.all_reduce(out)
    return out.cpu()


# torch 2.14 deprecates the collectives DeepSpeed 0.19's ZeRO-3 calls on every gather and reduce-scatter
# (all_gather_into_tensor, reduce_scatter_tensor and their private predecessors): a FutureWarning per call site and
# rank, 64 lines in a demo, that nothing on our side can act on.
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|" \
    r"_reduce_scatter_base)` is"


@contextmanager
def quiet_deprecated_collectives() -> Iterator[None]:
    """Drop exactly those FutureWarnings while a stage trains (scoped: nothing changes outside the block)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
        yield
