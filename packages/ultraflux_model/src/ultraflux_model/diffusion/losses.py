"""Training losses: the SNR-aware Huber wavelet loss (docs/design.md §3) as pure-torch references, and its dispatcher.

The references are differentiable, readable and the oracle of the fused Triton kernel in
:mod:`ultraflux_model.kernels.wavelet_loss`; :func:`training_loss` picks between the two with the one
dispatch rule of :mod:`ultraflux_model.kernels.dispatch`.

Math (t is clamped to ``[t_clamp, 1 - t_clamp]`` for the weights only):
    SNR  = (1 - t)² / t²
    ω(t) = t / (1 - t) · min(SNR, γ)^β
    c(t) = c_min + (c_max - c_min) · (min(SNR, γ) / γ)^α
    R    = W(x̂₀) - W(x₀)        W: one-level orthonormal Haar DWT, sub-bands stacked on channels
    ℓ_b  = mean over the elements of sample b of w_k · c²(√(1 + (R/c)²) - 1)   w_k: weight of R's sub-band k
    loss = mean over the batch of ω_b · ℓ_b
With the default band weights (1, 1, 1, 1) this is the paper's loss. Because W is orthonormal, the quadratic part
of the pseudo-Huber is the same in pixel space: the basis acts only through the saturation where |R| > c, which
shifts gradient towards the high-frequency bands when low-frequency errors are large (docs/training.md, "What the
wavelet term does"; :func:`band_energy_shares` measures it, :func:`snr_huber_spatial_loss` is the control).
"""

from __future__ import annotations

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import KernelChoice, LossConfig
from ultraflux_model.kernels.checks import check_band_weights, check_even_image, check_loss_inputs, check_loss_params
from ultraflux_model.kernels.dispatch import use_triton


def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal 2-D Haar DWT, identical to ``pywt.dwt2(x, "haar")`` per channel.

    Args:
        x: ``[B, C, H, W]`` with even ``H`` and ``W``.
    Returns:
        ``[B, 4C, H/2, W/2]``: channels ``[0, C)`` hold cA, then cH, cV, cD (pywt's order), so the
        high-frequency sub-bands are ``out[:, C:]``.
    """
    check_even_image(x, "x")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2x2 block
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    # Orthonormal: each sub-band is ±a ±b ±c ±d over 2 (1/√2 per axis), so W is its own inverse's transpose.
    return torch.cat([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=1) * 0.5


BANDS = ("LL", "LH", "HL", "HH")  # haar_dwt2's sub-band order: pywt's cA, cH, cV, cD


def haar_bands(x: torch.Tensor) -> torch.Tensor:
    """:func:`haar_dwt2` with the sub-band as its own axis.

    Args:
        x: ``[B, C, H, W]`` with even ``H`` and ``W``.
    Returns:
        ``[B, 4, C, H/2, W/2]``, the sub-bands in :data:`BANDS` order.
    """
    return haar_dwt2(x).unflatten(1, (4, x.shape[1]))


def band_energy_shares(grad: torch.Tensor) -> torch.Tensor:
    """Share of ``‖grad‖²`` in each Haar sub-band of ``grad`` (the band balance of a loss's gradient).

    Applied to ``∂loss/∂x̂₀`` it says which frequencies a loss pushes the prediction towards; as W is
    orthonormal the band energies add up to ``‖grad‖²`` exactly, so the shares sum to 1.

    Args:
        grad: ``[B, C, H, W]`` (even H, W), e.g. the gradient of a loss w.r.t. the prediction.
    Returns:
        ``[4]`` float64 shares in :data:`BANDS` order (LL, LH, HL, HH); the high-frequency share is ``[1:].sum()``.
    """
    energy = haar_bands(grad.to(torch.float64)).square().sum(dim=(0, 2, 3, 4))
    total = energy.sum()
    if not total > 0:
        raise UltraFluxError("band_energy_shares needs a non-zero, finite gradient")
    return energy / total


def pseudo_huber(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c²(√(1 + (r/c)²) - 1)`` elementwise, broadcasting ``c`` against ``r``.

    Written as ``r² / (√(1 + (r/c)²) + 1)`` (the same value) because the textbook form cancels to 0 in
    float32 once ``|r/c|`` drops below ~3e-4, which would zero small residuals' loss and gradient.
    """
    return r.square() / (torch.sqrt(1.0 + (r / c).square()) + 1.0)


def snr_weights(
    t: torch.Tensor,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    c_min: float,
    c_max: float,
    t_clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss weight ω(t) and pseudo-Huber scale c(t).

    Args:
        t: ``[B]`` flow-matching times in ``[0, 1]`` (1 = pure noise); clamped to ``[t_clamp, 1 - t_clamp]``.
    Returns:
        ``(omega, c)``, each ``[B]`` in ``t``'s floating dtype (float32 at least).
    """
    check_loss_params(gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp)
    t = t.to(torch.promote_types(t.dtype, torch.float32)).clamp(t_clamp, 1.0 - t_clamp)
    capped = torch.clamp(((1.0 - t) / t).square(), max=gamma)  # min(SNR, γ)
    omega = t / (1.0 - t) * capped.pow(beta)
    c = c_min + (c_max - c_min) * (capped / gamma).pow(alpha)
    return omega, c


def _snr_huber_mean(
    residual: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | float,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    c_min: float,
    c_max: float,
    t_clamp: float,
) -> torch.Tensor:
    """Batch mean of ω_b · mean over sample b's elements of ``weight · pseudo_huber(residual, c_b)``.

    ``residual`` is ``[B, ...]`` in the compute dtype; ``weight`` broadcasts against one sample's elements.
    """
    omega, c = snr_weights(
        t.to(residual.dtype), gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp
    )
    c = c.view(-1, *([1] * (residual.dim() - 1)))
    per_sample = (pseudo_huber(residual, c) * weight).mean(dim=tuple(range(1, residual.dim())))
    return (omega * per_sample).mean()


def _compute_dtype(pred_x0: torch.Tensor, target_x0: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(pred_x0.dtype, target_x0.dtype), torch.float32)


def snr_huber_wavelet_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    t: torch.Tensor,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    c_min: float,
    c_max: float,
    t_clamp: float,
    band_weights: tuple[float, float, float, float],
) -> torch.Tensor:
    """SNR-aware pseudo-Huber loss on the Haar wavelet residual (reference implementation).

    Args:
        pred_x0: ``[B, C, H, W]`` predicted clean latents (even H, W).
        target_x0: ``[B, C, H, W]`` clean latents.
        t: ``[B]`` times of the noisy inputs.
        band_weights: weights of the LL, LH, HL, HH sub-bands' terms (all 1: the paper's loss, bit for bit).
    Returns:
        Scalar loss, computed in float32 (float64 for float64 inputs) whatever the input dtype.
    """
    check_loss_inputs(pred_x0, target_x0, t)
    weights = check_band_weights(band_weights)
    compute = _compute_dtype(pred_x0, target_x0)
    residual = haar_dwt2(pred_x0.to(compute)) - haar_dwt2(target_x0.to(compute))
    # [4C, 1, 1]: sub-band-major channels, so each weight covers C consecutive channels. × 1.0 is exact.
    weight = torch.tensor(weights, dtype=compute, device=residual.device).repeat_interleave(pred_x0.shape[1])
    return _snr_huber_mean(
        residual, t, weight[:, None, None],
        gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp,
    )  # fmt: skip


def snr_huber_spatial_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    t: torch.Tensor,
    *,
    gamma: float,
    alpha: float,
    beta: float,
    c_min: float,
    c_max: float,
    t_clamp: float,
) -> torch.Tensor:
    """The same SNR-aware pseudo-Huber applied to the pixel (latent) residual instead of its Haar bands.

    Not a training objective of the paper: the control that isolates what the wavelet basis does (the two
    agree wherever the residual is small against c(t), see the module docstring).

    Args:
        pred_x0, target_x0: ``[B, C, H, W]``; t: ``[B]``.
    Returns:
        Scalar loss in float32 (float64 for float64 inputs).
    """
    check_loss_inputs(pred_x0, target_x0, t)
    compute = _compute_dtype(pred_x0, target_x0)
    return _snr_huber_mean(
        pred_x0.to(compute) - target_x0.to(compute), t, 1.0,
        gamma=gamma, alpha=alpha, beta=beta, c_min=c_min, c_max=c_max, t_clamp=t_clamp,
    )  # fmt: skip


def x0_from_velocity(z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate of a velocity prediction: ``x̂₀ = z_t - t·v`` (z_t = (1-t)·z + t·ε, v = ε - z).

    Args:
        z_t, v: ``[B, ...]`` noisy input and predicted velocity.
        t: ``[B]`` times (not clamped: this is the exact inverse of the noising).
    Returns:
        ``[B, ...]`` like ``z_t``.
    """
    if z_t.shape != v.shape:
        raise UltraFluxError(f"z_t {tuple(z_t.shape)} and v {tuple(v.shape)} must have the same shape")
    if t.shape != (z_t.shape[0],):
        raise UltraFluxError(f"t must be [B] = [{z_t.shape[0]}], got {tuple(t.shape)}")
    return z_t - t.to(v.dtype).view(-1, *([1] * (v.dim() - 1))) * v


def training_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    t: torch.Tensor,
    *,
    cfg: LossConfig,
    kernel: KernelChoice = "auto",
) -> torch.Tensor:
    """The SNR-aware Huber wavelet loss through the fused Triton kernel or the reference, per ``kernel``.

    Both paths take the same arguments and agree to float32 rounding; see :func:`snr_huber_wavelet_loss`.
    """
    params = cfg.model_dump()
    if use_triton(kernel, pred_x0):
        from ultraflux_model.kernels.wavelet_loss import snr_huber_wavelet_loss as fused  # Triton is optional

        return fused(pred_x0, target_x0, t, **params)
    return snr_huber_wavelet_loss(pred_x0, target_x0, t, **params)
