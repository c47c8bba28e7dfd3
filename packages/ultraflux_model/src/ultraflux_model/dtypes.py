"""The torch dtype behind each config ``Dtype`` name (one table for generation, caches, training and checkpoints),
and what generation's ``auto`` means on a device."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """``dtype`` itself, or for ``auto`` bf16 on a GPU and fp32 elsewhere: CPUs run bf16 matmuls slower than fp32
    (most lack bf16 units) and lose precision for nothing (docs/app.md)."""
    if dtype != "auto":
        return dtype
    return "bf16" if torch.device(device).type == "cuda" else "fp32"
