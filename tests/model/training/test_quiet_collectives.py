"""The demo's 64 torch.distributed FutureWarnings (DeepSpeed's ZeRO-3 collectives, deprecated by torch) are dropped
while a stage trains, and only there (issue 20, item 1)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from ultraflux_model.training.distributed import quiet_deprecated_collectives

from tests.servers import free_port


@pytest.fixture
def one_rank():
    if dist.is_initialized():
        # Left by an earlier test of this worker process (always one rank in-process): used as it is. Destroying it
        # would leave DeepSpeed's communication backend holding a dead group for the later tests of this worker.
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _gather_warnings(quiet: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_deprecated_collectives() if quiet else nullcontext():
            out = torch.zeros(2)
            dist.all_gather_into_tensor(out, torch.ones(2))  # what DeepSpeed ZeRO-3 calls per gather
            dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))
            warnings.warn("an unrelated deprecation", FutureWarning, stacklevel=1)
    return [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]


def test_only_the_deprecated_collectives_are_dropped(one_rank):
    loud = _gather_warnings(quiet=False)
    assert any("all_gather_into_tensor" in m for m in loud) and any("reduce_scatter_tensor" in m for m in loud)
    assert _gather_warnings(quiet=True) == ["an unrelated deprecation"]
