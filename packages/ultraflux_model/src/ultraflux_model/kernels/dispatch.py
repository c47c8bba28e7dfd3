"""The one rule that decides between a Triton kernel and its pure-torch reference.

``auto``  : Triton for CUDA tensors when Triton imports, the reference otherwise.
``triton``: always the kernel. CPU tensors then need ``TRITON_INTERPRET=1`` set before the kernels are
            defined (CI runs the kernels that way); without it this raises instead of crashing in Triton.
``eager`` : always the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from ultraflux_core.errors import UltraFluxError


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(choice: str, tensor: torch.Tensor) -> bool:
    """True when ``tensor`` should go through the Triton kernel under ``choice`` (``auto``, ``eager`` or ``triton``:
    the values of ``ultraflux_model.config.KernelChoice``; a plain string here because kernels import no config)."""
    if choice == "eager":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if choice != "triton":
        raise UltraFluxError(f"kernel choice must be auto, eager or triton, got {choice!r}")
    if not triton_available():
        raise UltraFluxError("kernels=triton was requested but triton is not installed: pip install triton")
    if not tensor.is_cuda and not interpreting():
        raise UltraFluxError(
            "kernels=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment (set before import); "
            "use kernels=auto to fall back to the reference on CPU"
        )
    return True
