"""The one way the eval package reads a weights file: safetensors, or a torch checkpoint with ``weights_only=True``.

Its own module so that every backbone loader (``backbones``, ``iqa``) can share it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch checkpoint read with ``weights_only=True`` (never unpickles code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
