"""Seeded residuals for the band-rebalancing tests, shared by the reference-loss and the fused-kernel tests.

A residual ``x̂₀ - x₀`` dominated by low frequencies, as early in training or at high noise: coarse noise
upsampled (bicubic) to the latent size, plus a tenth as much i.i.d. noise (the high-frequency part).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ultraflux_model.diffusion.losses import band_energy_shares

# t = 0.3 has SNR (0.7/0.3)² > γ = 5 (LossConfig's default), so c(t) = c_max = 1: the Huber knee is at |R| = 1.
T_KNEE_AT_ONE = 0.3


def correlated_residual(
    std: float, *, seed: int = 0, shape: tuple[int, int, int, int] = (2, 4, 32, 32)
) -> torch.Tensor:
    """``[B, C, H, W]`` float64 low-frequency field of standard deviation ≈ ``std`` (plus 10 % i.i.d. noise)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    coarse = torch.randn(b, c, h // 8, w // 8, generator=gen, dtype=torch.float64)
    low = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return std * (low / low.std() + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64))


def gradient_shares(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    """``[4]`` band shares (LL, LH, HL, HH) of ``∂loss(x₀ + residual, x₀)/∂x̂₀``, with x₀ = 0 (the losses see only
    the residual)."""
    pred = residual.clone().requires_grad_(True)
    loss(pred, torch.zeros_like(residual)).backward()
    return band_energy_shares(pred.grad)
