"""The LoRA adapter folder: add adapters to the transformer, write them, read them back.

Writing side of the contract every adapter consumer (export, generation, release) reads:
``ADAPTER_FILE`` is exactly what ``diffusers.FluxPipeline.save_lora_weights(dir,
transformer_lora_layers=peft.get_peft_model_state_dict(transformer))`` writes (keys
``transformer.<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r]), and ``META_FILE`` records what the
file does not: the base it was trained on and the LoRA hyper-parameters. An adapted layer computes
``W·x + (alpha/rank)·B·A·x``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import commit_folder

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "ultraflux_lora.json"
ADAPTER_NAME = "default"  # peft's adapter name inside the module names (``….lora_A.default.weight``)
PREFIX = "transformer."  # diffusers' component prefix in ADAPTER_FILE
REQUIRED_META = ("base", "base_fingerprint", "rank", "alpha", "targets", "method")


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name of the adapted transformer belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: Iterable[str]
             ) -> list[str]:
    """Inject LoRA adapters (peft, through diffusers' ``add_adapter``) and freeze everything else.

    A starts Kaiming-uniform (from torch's global RNG), B at zero, so the adapted model starts equal to the base.
    Returns the names of the trainable (adapter) parameters.
    """
    from peft import LoraConfig

    targets = list(targets)
    try:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                           init_lora_weights=True), adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise UltraFluxError(f"LoRA targets {targets} do not fit the transformer: {err}") from err
    trainable = []
    for name, param in transformer.named_parameters():
        param.requires_grad_(is_adapter_param(name))  # the base stays frozen: only the adapters learn
        if param.requires_grad:
            trainable.append(name)
    return trainable


def adapter_state(transformer: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The adapter weights as peft names them outside the model (``<module>.lora_A.weight``).

    ``tensors``: full tensors keyed by the model's parameter names (gathered ZeRO-3 partitions, EMA weights);
    default the module's own state dict.
    """
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, state_dict=tensors, adapter_name=ADAPTER_NAME)


def save_adapter(transformer: torch.nn.Module, out_dir: Path | str, meta: dict[str, Any],
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter folder ``out_dir`` atomically (the whole old folder or the whole new one).

    ``state``: the peft-named adapter weights (``adapter_state``); default the module's own. ``meta`` must hold
    ``REQUIRED_META`` (``method`` is filled in as ``lora``).
    """
    from diffusers import FluxPipeline

    meta = {"method": "lora", **meta}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UltraFluxError(f"adapter metadata lacks {missing}")
    state = adapter_state(transformer) if state is None else state
    with commit_folder(out_dir) as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers={k: v.detach().cpu().contiguous()
                                                                     for k, v in state.items()})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def read_meta(adapter_dir: Path | str) -> dict[str, Any]:
    """The ``META_FILE`` of an adapter folder (refusing a folder that is not one, naming what is missing)."""
    folder = Path(adapter_dir)
    for name in (ADAPTER_FILE, META_FILE):
        if not (folder / name).is_file():
            raise UltraFluxError(f"LoRA adapter {folder} has no {name}: an adapter folder holds {ADAPTER_FILE} and "
                                 f"{META_FILE} (what LoRA training writes)")  # fmt: skip
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UltraFluxError(f"LoRA adapter {folder}: {META_FILE} is not valid JSON ({err})") from None
    missing = [key for key in REQUIRED_META if key not in meta] if isinstance(meta, dict) else list(REQUIRED_META)
    if missing:
        raise UltraFluxError(f"LoRA adapter {folder}: {META_FILE} lacks {', '.join(missing)}")
    return meta


@torch.no_grad()
def load_adapter_state(transformer: torch.nn.Module, adapter_dir: Path | str) -> dict[str, Any]:
    """Copy an adapter folder's weights into the transformer's (already added) adapters; returns its metadata.

    Strict: every adapter parameter of the model must be in the file with its shape, and nothing else.
    """
    from safetensors.torch import load_file

    meta = read_meta(adapter_dir)
    loaded = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    params = {n: p for n, p in transformer.named_parameters() if is_adapter_param(n)}
    wanted = {}
    for key, tensor in loaded.items():
        if not key.startswith(PREFIX) or not key.endswith(".weight"):
            raise UltraFluxError(f"{adapter_dir}/{ADAPTER_FILE} has key {key}, not a transformer LoRA weight")
        wanted[f"{key[len(PREFIX):-len('.weight')]}.{ADAPTER_NAME}.weight"] = tensor
    missing, unexpected = sorted(set(params) - set(wanted)), sorted(set(wanted) - set(params))
    if missing or unexpected:
        raise UltraFluxError(
            f"adapter {adapter_dir} does not fit the model's adapters (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): use the same rank and targets it was trained with"
        )
    for name, param in params.items():
        if tuple(wanted[name].shape) != tuple(param.shape):
            raise UltraFluxError(f"adapter {adapter_dir}: {name} has shape {tuple(wanted[name].shape)}, the model "
                                 f"{tuple(param.shape)}: use the same rank it was trained with")
        param.copy_(wanted[name])
    return meta
