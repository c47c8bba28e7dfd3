"""Argument checks of the SNR-aware Huber wavelet loss, shared by its torch reference
(``ultraflux_model.diffusion.losses``) and the Triton kernel (``kernels.wavelet_loss``).

A leaf like every kernel module: hyper-parameters arrive as plain numbers (their defaults and documented ranges
are ``ultraflux_model.config.LossConfig``'s); these checks are the math's own domain, so a direct caller that
bypasses the config still gets a clear error instead of NaNs.
"""

from __future__ import annotations

import math

import torch
from ultraflux_core.errors import UltraFluxError


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
    """Raise ``UltraFluxError`` for hyper-parameters outside the loss's domain (γ > 0, α, β ≥ 0,
    0 < c_min ≤ c_max, 0 < t_clamp < 0.5)."""
    problems = [text for bad, text in (
        (not gamma > 0, f"gamma must be > 0, got {gamma}"),
        (not alpha >= 0, f"alpha must be >= 0, got {alpha}"),
        (not beta >= 0, f"beta must be >= 0, got {beta}"),
        (not c_min > 0, f"c_min must be > 0, got {c_min}"),
        (not c_max >= c_min, f"c_min ({c_min}) must not exceed c_max ({c_max}); lower c_min or raise c_max"),
        (not 0 < t_clamp < 0.5, f"t_clamp must lie in (0, 0.5), got {t_clamp}"),
    ) if bad]
    if problems:
        raise UltraFluxError("invalid loss parameters: " + "; ".join(problems))


def check_band_weights(band_weights: tuple[float, ...]) -> tuple[float, float, float, float]:
    """The 4 Haar sub-band weights (LL, LH, HL, HH) as floats; ``UltraFluxError`` unless 4 positive finite numbers."""
    weights = tuple(float(w) for w in band_weights)
    if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise UltraFluxError(f"band_weights must be 4 positive finite numbers (LL, LH, HL, HH), got {band_weights}")
    return weights  # type: ignore[return-value]


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
