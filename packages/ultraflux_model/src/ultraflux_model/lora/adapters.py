"""The adapter folder: diffusers' LoRA weights file plus our metadata beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # FluxPipeline.save_lora_weights's default name
META_FILE = "ultraflux_lora.json"


def save_adapter(transformer: torch.nn.Module, out_dir: Path | str, meta: dict[str, Any]) -> Path:
    """Write ``transformer``'s peft LoRA weights as diffusers does and ``meta`` (base, base_fingerprint, rank,
    alpha, targets) beside them; returns the folder."""
    from diffusers import FluxPipeline
    from peft import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name=ADAPTER_FILE)
    (out / META_FILE).write_text(json.dumps({**meta, "method": "lora"}, indent=2, sort_keys=True) + "\n")
    return out
