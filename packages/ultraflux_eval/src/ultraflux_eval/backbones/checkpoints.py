"""The one way the eval package reads a weights file: safetensors, or a torch checkpoint with ``weights_only=True``;
and the one reader of Hugging Face checkpoint indexes (``*.index.json``), for loaders and the fetcher alike.

Its own module so that every backbone loader (``backbones``, ``iqa``, ``qalign``, ``artimuse``) and ``weights`` can
share it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ultraflux_eval.errors import EvalError

# (index file, single file) of the two Hugging Face checkpoint layouts
SAFETENSORS_LAYOUT = ("model.safetensors.index.json", "model.safetensors")
PICKLE_LAYOUT = ("pytorch_model.bin.index.json", "pytorch_model.bin")


def shard_names(index: Path) -> list[str]:
    """The files an HF checkpoint index names in its ``weight_map`` (sorted, once each), all beside the index."""
    try:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise EvalError(f"{index} is not a checkpoint index (no weight_map): {err}") from err
    outside = [name for name in names if "/" in name or name.startswith(".")]
    if outside:
        raise EvalError(f"{index} names shards outside its folder: {outside}")
    return names


def checkpoint_files(folder: Path, layouts: tuple[tuple[str, str], ...] = (SAFETENSORS_LAYOUT,)) -> list[Path] | None:
    """The weight files of an HF folder in the first of ``layouts`` it has — every shard its index names, or the
    single file — or None when it has none of them."""
    for index, single in layouts:
        if (folder / index).is_file():
            return [folder / name for name in shard_names(folder / index)]
        if (folder / single).is_file():
            return [folder / single]
    return None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch checkpoint read with ``weights_only=True`` (never unpickles code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
