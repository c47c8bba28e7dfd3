"""The torch dtype behind each config ``Dtype`` name (one table for generation, caches, training and checkpoints)."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
