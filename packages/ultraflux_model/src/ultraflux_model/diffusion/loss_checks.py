"""Argument checks of the SNR-aware Huber wavelet loss, shared by the torch reference and the Triton kernel.

Apart from :mod:`ultraflux_model.diffusion.losses` so that the kernel module (which the reference's dispatcher
imports) does not import the reference module back.
"""

from __future__ import annotations

import torch

from ultraflux_model.config import LossConfig
from ultraflux_model.errors import UltraFluxError


def check_even_image(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise UltraFluxError(f"{name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if height % 2 or width % 2 or height == 0 or width == 0:
        raise UltraFluxError(
            f"{name} has spatial size {height}x{width}: the Haar DWT needs even, non-zero H and W "
            "(crop or pad the latents to an even size)"
        )


def check_loss_params(*, gamma: float, alpha: float, beta: float, c_min: float, c_max: float, t_clamp: float) -> None:
    """Raise ``UltraFluxError`` for hyper-parameters outside :class:`~ultraflux_model.config.LossConfig`'s ranges."""
    try:
        LossConfig(gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp)
    except ValueError as err:  # pydantic's ValidationError lists every offending field
        raise UltraFluxError(f"invalid loss parameters: {err}") from err


def check_loss_inputs(pred_x0: torch.Tensor, target_x0: torch.Tensor, t: torch.Tensor) -> None:
    """Raise ``UltraFluxError`` unless pred/target are equal-shape ``[B, C, H, W]`` (even H, W) and t is ``[B]``."""
    check_even_image(pred_x0, "pred_x0")
    if pred_x0.shape != target_x0.shape:
        raise UltraFluxError(
            f"pred_x0 {tuple(pred_x0.shape)} and target_x0 {tuple(target_x0.shape)} must have the same shape"
        )
    if t.shape != (pred_x0.shape[0],):
        raise UltraFluxError(f"t must be [B] = [{pred_x0.shape[0]}] (one time per sample), got {tuple(t.shape)}")
    if not (pred_x0.is_floating_point() and target_x0.is_floating_point() and t.is_floating_point()):
        raise UltraFluxError("pred_x0, target_x0 and t must be floating-point tensors")
