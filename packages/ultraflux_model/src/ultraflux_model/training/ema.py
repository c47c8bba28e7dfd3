"""Exponential moving average of the trained weights, kept on each rank's own ZeRO partition.

Under ZeRO-3 a rank holds only its flat slice (``param.ds_tensor``) of every parameter, so the EMA costs
1/world_size of a full copy per rank, in fp32. Without ZeRO-3 the "partition" is the whole tensor.

The average follows the optimizer's fp32 master weights, not the (bf16) model parameters: with bf16 params an
update smaller than bf16's resolution (lr 1e-6 on weights near 0.1 is one) leaves the parameter unchanged while
the master moves, and an EMA of the rounded parameters would average rounding noise. ZeRO-3's master partition
is laid out exactly like ``ds_tensor`` (``deepspeed.utils.safe_get_local_fp32_param``). For the
export the shards are all-gathered directly (ZeRO-3 lays a parameter out flat, rank r holding elements
[r·n, (r+1)·n), the last one padded), never through the module, whose small "persistent" parameters DeepSpeed
keeps gathered and would not refresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from ultraflux_core.errors import UltraFluxError


def local_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``param`` this rank owns: the ZeRO-3 partition, or the tensor itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def master_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master weights of this rank's part of ``param``, laid out like ``local_shard(param)``.

    ZeRO-3: the optimizer's fp32 partition. ZeRO-1/2 with bf16/fp16 params: the full fp32 master (a collective
    gather, so every rank must ask). Otherwise (fp32 training, or no DeepSpeed optimizer yet) the parameter is its
    own master.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    if hasattr(param, "ds_id") and getattr(param, "_z3_optimizer", None) is not None:
        return safe_get_local_fp32_param(param)
    if getattr(param, "_hp_mapping", None) is not None:
        return safe_get_full_fp32_param(param)
    return local_shard(param)


class ShardedEma:
    """``shadow ← decay·shadow + (1−decay)·master`` on every trainable parameter's local fp32 master shard."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self._params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: master_shard(p).detach().float().clone() for name, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self._params.items():
            self.shadow[name].lerp_(master_shard(param).float(), 1.0 - self.decay)

    @torch.no_grad()
    def full_tensors(self, is_main: bool) -> dict[str, torch.Tensor]:
        """Collective: the EMA weights as full CPU tensors (each parameter's dtype) on the main rank, {} elsewhere."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self._params.items():
            shard = self.shadow[name]
            if hasattr(param, "ds_tensor"):
                group = getattr(param, "ds_process_group", None)
                parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
                torch.distributed.all_gather(parts, shard, group=group)
                full = torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
            else:
                full = shard.view(param.shape)
            if is_main:
                out[name] = full.to("cpu", param.dtype).contiguous()
        return out

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
