"""Exponential moving average of the trained weights, kept on each rank's own ZeRO partition.

Under ZeRO-3 a rank holds only its flat slice (``param.ds_tensor``) of every parameter, so the EMA costs
1/world_size of a full copy per rank, in fp32. Without ZeRO-3 the "partition" is the whole tensor. The
shadow is swapped into the partitions for export, then swapped back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ultraflux_model.errors import UltraFluxError


def local_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``param`` this rank owns: the ZeRO-3 partition, or the tensor itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ShardedEma:
    """``shadow ← decay·shadow + (1−decay)·weights`` on every trainable parameter's local shard."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self._params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: local_shard(p).detach().float().clone() for name, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self._params.items():
            self.shadow[name].lerp_(local_shard(param).float(), 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Within the block the module's (local) weights are the EMA weights."""
        backup = {name: local_shard(p).clone() for name, p in self._params.items()}
        for name, param in self._params.items():
            local_shard(param).copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, param in self._params.items():
                local_shard(param).copy_(backup[name])

    def save(self, path: Path) -> None:
        save_file({name: t.contiguous() for name, t in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            raise UltraFluxError(f"EMA state {path} does not match the model's parameters; resume with the same model")
        for name, tensor in loaded.items():
            if tensor.shape != self.shadow[name].shape:
                raise UltraFluxError(
                    f"EMA state {path} has {name} of shape {tuple(tensor.shape)}, expected "
                    f"{tuple(self.shadow[name].shape)}: resume with the same number of ranks"
                )
            self.shadow[name].copy_(tensor)
