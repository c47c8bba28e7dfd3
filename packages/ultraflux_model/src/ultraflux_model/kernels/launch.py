"""Checks shared by the Triton launchers: can this kernel object run on these tensors?

Triton decides at decoration time whether ``@triton.jit`` yields a GPU ``JITFunction`` or a CPU
``InterpretedFunction`` (``TRITON_INTERPRET=1`` read when the kernel module is imported). Launching the
wrong kind crashes deep inside Triton, so the launchers call :func:`check_launchable` first and raise an
``UltraFluxError`` that says what to change.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction
from ultraflux_core.errors import UltraFluxError


def check_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise unless all ``tensors`` share one device that ``kernel`` (a ``@triton.jit`` object) can run on."""
    devices = {x.device for x in tensors}
    if len(devices) != 1:
        raise UltraFluxError(f"Triton kernel inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cpu" and not interpreted:
        raise UltraFluxError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before ultraflux_model.kernels is imported; "
            "set it at process start or use the eager reference (kernel choice 'eager' or 'auto')"
        )
    if device.type != "cpu" and interpreted:
        raise UltraFluxError(
            "TRITON_INTERPRET=1 was set when the kernels were imported, so they only run on CPU tensors; "
            f"unset it to run them on {device}"
        )
    if device.type not in ("cpu", "cuda"):
        raise UltraFluxError(f"Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not on {device}")
