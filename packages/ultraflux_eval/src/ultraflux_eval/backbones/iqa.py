"""No-reference IQA networks of the paper's table that come from pyiqa's released architecture code.

- MUSIQ (Ke et al., 2021): pyiqa's ``MUSIQ`` class (``pyiqa/archs/musiq_arch.py``) with its KonIQ-10k head
  (``musiq_koniq_ckpt-e95806b9.pth``, pyiqa's default for ``create_metric("musiq")``): one MOS per image on a
  0-100 scale, computed on multi-scale patches of the image at native resolution plus resized copies with the
  longer side 224 and 384.

pyiqa declares heavy requirements (non-headless OpenCV, bitsandbytes, tensorboard, ...) that the architecture
code does not use; ``make setup`` installs it with ``pip install --no-deps`` next to the ``paper`` extra.

Trust: pyiqa's checkpoints are pickles; they load only after their sha256 matches the manifest, and with
``torch.load(weights_only=True)`` (tensors only, never code).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ultraflux_eval.backbones.checkpoints import load_state_dict_file
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.table import PAPER_EXTRA_HINT

# pyiqa's MUSIQ defaults (KonIQ-10k checkpoint: one regression output)
MUSIQ_ARCH = dict(num_class=1, hidden_size=384, mlp_dim=1152, num_heads=6, num_layers=14,
                  longer_side_lengths=[224, 384])
# A tiny MUSIQ for CI: the same class and data path, narrower and shallower.
TINY_MUSIQ_ARCH = dict(num_class=1, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                       longer_side_lengths=[64, 96])


def _musiq_class() -> type[nn.Module]:
    try:
        return importlib.import_module("pyiqa.archs.musiq_arch").MUSIQ
    except ImportError as err:
        raise EvalError(f"the musiq metric needs pyiqa's architecture code: {PAPER_EXTRA_HINT} ({err})") from err


class MusiqScorer(nn.Module):
    """pyiqa MUSIQ as a score module: float ``[1, 3, H, W]`` in [0, 1] → ``[1]`` MOS (one image at a time,
    native resolution, as MUSIQ is defined)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(images.shape[0])


def build_musiq(state_dict: dict[str, torch.Tensor] | None = None, tiny: bool = False, seed: int = 0) -> MusiqScorer:
    """MUSIQ with ``state_dict`` loaded strictly (real arch), or a seeded random tiny one (``tiny=True``)."""
    arch = TINY_MUSIQ_ARCH if tiny else MUSIQ_ARCH
    torch.manual_seed(seed)
    net = _musiq_class()(pretrained=False, **arch)
    if state_dict is not None:
        state_dict = state_dict.get("params", state_dict)  # pyiqa's checkpoints may nest under `params`
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise EvalError(f"the MUSIQ checkpoint does not fit pyiqa's KonIQ MUSIQ: {err}") from err
    return MusiqScorer(net)


def tiny_musiq(seed: int = 0) -> MusiqScorer:
    """MUSIQ's class at toy width (:data:`TINY_MUSIQ_ARCH`), seeded random weights."""
    return build_musiq(tiny=True, seed=seed)


def load_musiq(path: Path) -> MusiqScorer:
    """pyiqa's MUSIQ checkpoint (``.pth`` read with ``weights_only=True``, or ``.safetensors``)."""
    try:
        state = load_state_dict_file(Path(path))
    except Exception as err:  # noqa: BLE001 - unsafe or corrupt pickles raise several types
        raise EvalError(f"cannot read the MUSIQ checkpoint {path} as plain tensors: {err}") from err
    return build_musiq(state)
