"""Reference SNR-aware Huber wavelet loss: Haar DWT vs PyWavelets, weights vs docs/design.md §3, a numpy oracle,
gradcheck, band weights, and the band rebalancing the Huber's saturation causes (docs/training.md, "What the wavelet
term does")."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import pywt
import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import LossConfig
from ultraflux_model.diffusion.losses import (
    band_energy_shares,
    haar_bands,
    haar_dwt2,
    pseudo_huber,
    snr_huber_spatial_loss,
    snr_huber_wavelet_loss,
    snr_weights,
    training_loss,
    x0_from_velocity,
)

from tests.model.loss_fields import T_KNEE_AT_ONE, correlated_residual, gradient_shares

# The loss functions take every hyper-parameter (their defaults live only in LossConfig).
LOSS = LossConfig().model_dump()
SNR = {k: v for k, v in LOSS.items() if k != "band_weights"}  # snr_weights' and the spatial control's parameters


def _numpy_loss(
    pred: np.ndarray,
    target: np.ndarray,
    t: np.ndarray,
    gamma,
    alpha,
    beta,
    c_min,
    c_max,
    band_weights=(1.0, 1.0, 1.0, 1.0),
) -> float:
    """docs/design.md §3 written out literally with pywt as W, in float64 (independent of the torch code)."""
    losses = []
    for b in range(pred.shape[0]):
        tb = min(max(float(t[b]), 1e-3), 1 - 1e-3)
        snr = (1 - tb) ** 2 / tb**2
        omega = tb / (1 - tb) * min(snr, gamma) ** beta
        c = c_min + (c_max - c_min) * (min(snr, gamma) / gamma) ** alpha
        bands, weights = [], []
        for ch in range(pred.shape[1]):
            ca_p, details_p = pywt.dwt2(pred[b, ch], "haar")
            ca_t, details_t = pywt.dwt2(target[b, ch], "haar")
            bands += [ca_p - ca_t] + [dp - dt for dp, dt in zip(details_p, details_t, strict=True)]
            weights += list(band_weights)  # cA, cH, cV, cD of this channel
        r = np.stack(bands)
        w = np.asarray(weights)[:, None, None]
        losses.append(omega * np.mean(w * c**2 * (np.sqrt(1 + (r / c) ** 2) - 1)))
    return float(np.mean(losses))


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 1, 2, 2), (3, 2, 4, 10)])
def test_haar_dwt2_matches_pywt(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = haar_dwt2(x)
    channels = shape[1]
    assert out.shape == (shape[0], 4 * channels, shape[2] // 2, shape[3] // 2)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))
    for k, band in enumerate((ca, ch, cv, cd)):
        np.testing.assert_allclose(out[:, k * channels : (k + 1) * channels].numpy(), band, rtol=0, atol=1e-12)


def test_haar_dwt2_is_orthonormal():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = haar_dwt2(x)
    torch.testing.assert_close(out.square().sum(), x.square().sum())
    # W is linear and orthonormal: the vector-Jacobian product of W(x)·g is the inverse transform of g.
    g = torch.randn_like(out)
    x.requires_grad_(True)
    (haar_dwt2(x) * g).sum().backward()
    torch.testing.assert_close(haar_dwt2(x.grad), g)


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (1, 1, 4, 3), (4, 4), (1, 1, 0, 2)])
def test_haar_dwt2_rejects_bad_shapes(shape):
    with pytest.raises(UltraFluxError):
        haar_dwt2(torch.zeros(shape))


def test_snr_weights_follow_design_formulas():
    t = torch.tensor([0.0, 0.1, 0.5, 0.8, 1.0], dtype=torch.float64)
    omega, c = snr_weights(t, **{**SNR, **dict(gamma=5.0, alpha=0.5, beta=0.5, c_min=0.2, c_max=1.0)})
    expected_omega, expected_c = [], []
    for tb in (1e-3, 0.1, 0.5, 0.8, 1 - 1e-3):
        capped = min((1 - tb) ** 2 / tb**2, 5.0)
        expected_omega.append(tb / (1 - tb) * math.sqrt(capped))
        expected_c.append(0.2 + 0.8 * math.sqrt(capped / 5.0))
    torch.testing.assert_close(omega, torch.tensor(expected_omega, dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor(expected_c, dtype=torch.float64))
    # Low noise (SNR ≥ γ) uses the widest Huber scale; t = 0.5 has SNR 1.
    assert c[0] == pytest.approx(1.0) and c[2] == pytest.approx(0.2 + 0.8 / math.sqrt(5.0))


def test_pseudo_huber_equals_textbook_form_and_keeps_small_residuals():
    r = torch.linspace(-3, 3, 101, dtype=torch.float64)
    c = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(pseudo_huber(r, c), c**2 * (torch.sqrt(1 + (r / c) ** 2) - 1))
    tiny = torch.tensor([1e-5], dtype=torch.float32)
    assert pseudo_huber(tiny, torch.tensor(1.0)).item() == pytest.approx(0.5e-10, rel=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        dict(gamma=5.0, alpha=0.5, beta=0.5, c_min=0.2, c_max=1.0),
        dict(gamma=2.0, alpha=1.0, beta=1.5, c_min=0.5, c_max=0.5),  # c_max == c_min: constant scale
        dict(gamma=50.0, alpha=0.25, beta=0.0, c_min=0.05, c_max=2.0),
        dict(gamma=5.0, alpha=0.5, beta=0.5, c_min=0.2, c_max=1.0, band_weights=(0.5, 2.0, 3.0, 0.25)),
    ],
)
def test_loss_matches_numpy_oracle(params):
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(4, 3, 6, 10, dtype=torch.float64, generator=gen)
    target = torch.randn(4, 3, 6, 10, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.0, 1e-4, 0.37, 1.0], dtype=torch.float64)  # both clamps and the middle
    loss = snr_huber_wavelet_loss(pred, target, t, **{**LOSS, **params})
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(_numpy_loss(pred.numpy(), target.numpy(), t.numpy(), **params), rel=1e-12)


def test_loss_is_zero_on_perfect_prediction_and_float32_for_bf16():
    x = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    loss = snr_huber_wavelet_loss(x, x.clone(), torch.tensor([0.2, 0.9]), **LOSS)
    assert loss.dtype == torch.float32 and loss.item() == 0.0


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 2, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(2, 2, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, q: snr_huber_wavelet_loss(p, q, t, **{**LOSS, "c_min": 0.3}), (pred, target)
    )
    assert torch.autograd.gradcheck(haar_dwt2, (pred,))


def test_loss_rejects_mismatched_inputs():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(UltraFluxError, match="same shape"):
        snr_huber_wavelet_loss(x, torch.zeros(2, 1, 4, 6), torch.zeros(2), **LOSS)
    with pytest.raises(UltraFluxError, match=r"t must be \[B\]"):
        snr_huber_wavelet_loss(x, x, torch.zeros(2, 1), **LOSS)
    with pytest.raises(UltraFluxError, match="even"):
        snr_huber_wavelet_loss(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), torch.zeros(2), **LOSS)
    with pytest.raises(UltraFluxError, match="c_min"):
        snr_huber_wavelet_loss(x, x, torch.zeros(2), **{**LOSS, "c_min": 2.0, "c_max": 1.0})


def test_x0_from_velocity_inverts_the_flow_matching_noising():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=gen)
    eps = torch.randn_like(z)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    z_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x0_from_velocity(z_t, eps - z, t), z)
    with pytest.raises(UltraFluxError):
        x0_from_velocity(z_t, eps, t[:2])


def test_loss_config_validation_and_cpu_dispatch():
    assert LossConfig() == LossConfig(
        gamma=5.0, alpha=0.5, beta=0.5, c_min=0.2, c_max=1.0, t_clamp=1e-3, band_weights=(1.0, 1.0, 1.0, 1.0)
    )
    with pytest.raises(pydantic.ValidationError, match="c_min"):
        LossConfig(c_min=1.5)
    with pytest.raises(pydantic.ValidationError):
        LossConfig(t_clamp=0.5)
    cfg = LossConfig(gamma=3.0, c_min=0.4)
    gen = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 2, 4, 4, generator=gen), torch.randn(2, 2, 4, 4, generator=gen)
    t = torch.tensor([0.1, 0.6])
    expected = snr_huber_wavelet_loss(pred, target, t, **{**LOSS, "gamma": 3.0, "c_min": 0.4})
    for choice in ("auto", "eager"):  # CPU tensors: both pick the reference
        torch.testing.assert_close(training_loss(pred, target, t, cfg=cfg, kernel=choice), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- band weights and band rebalancing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_default_band_weights_are_todays_loss_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(6)
    pred = torch.randn(3, 4, 8, 6, generator=gen).to(dtype)
    target = torch.randn(3, 4, 8, 6, generator=gen).to(dtype)
    t = torch.tensor([0.05, 0.5, 0.9])
    # The loss before band weights existed, written out.
    compute = torch.promote_types(dtype, torch.float32)
    omega, c = snr_weights(t.to(compute), **SNR)
    residual = haar_dwt2(pred.to(compute)) - haar_dwt2(target.to(compute))
    today = (omega * pseudo_huber(residual, c[:, None, None, None]).mean(dim=(1, 2, 3))).mean()
    assert LossConfig().band_weights == (1.0, 1.0, 1.0, 1.0)
    torch.testing.assert_close(snr_huber_wavelet_loss(pred, target, t, **LOSS), today, rtol=0, atol=0)


def test_band_weights_scale_each_band_and_are_validated():
    gen = torch.Generator().manual_seed(7)
    pred = torch.randn(2, 3, 6, 8, dtype=torch.float64, generator=gen)
    target = torch.randn(2, 3, 6, 8, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.2, 0.6], dtype=torch.float64)
    # The loss is linear in the weights: with weights w it is Σ_k w_k · (the loss of band k alone, × 4).
    weights = (0.5, 2.0, 3.0, 0.25)
    omega, c = snr_weights(t, **SNR)
    per_band = []
    for k in range(4):
        mask = torch.zeros(4, 3, 1, 1, dtype=torch.float64)
        mask[k] = 1.0
        residual = (haar_bands(pred) - haar_bands(target)) * mask  # only band k differs
        per_band.append((omega * pseudo_huber(residual, c.view(-1, 1, 1, 1, 1)).mean(dim=(1, 2, 3, 4))).mean())
    expected = sum(w * loss for w, loss in zip(weights, per_band, strict=True))
    got = snr_huber_wavelet_loss(pred, target, t, **{**LOSS, "band_weights": weights})
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    for bad in [
        (1.0, 1.0, 1.0),
        (1.0, 0.0, 1.0, 1.0),
        (1.0, -1.0, 1.0, 1.0),
        (1.0, float("inf"), 1.0, 1.0),
        (float("nan"), 1.0, 1.0, 1.0),
    ]:
        with pytest.raises(UltraFluxError, match="band_weights"):
            snr_huber_wavelet_loss(pred, target, t, **{**LOSS, "band_weights": bad})
        with pytest.raises(pydantic.ValidationError, match="band_weights"):
            LossConfig(band_weights=bad)
    cfg = LossConfig(band_weights=weights)
    torch.testing.assert_close(training_loss(pred, target, t, cfg=cfg, kernel="eager"), got, rtol=0, atol=0)


def test_band_energy_shares_add_up_and_find_the_band():
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    shares = band_energy_shares(g)
    assert shares.shape == (4,) and shares.sum().item() == pytest.approx(1.0, abs=1e-12)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(4, 4)  # a pure cD (HH) pattern
    torch.testing.assert_close(
        band_energy_shares(checker.expand(1, 2, 8, 8)), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    )
    rows = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(4)[:, None].expand(8, 8)  # rows alternate: cH (LH)
    assert band_energy_shares(rows.expand(1, 1, 8, 8))[1].item() == pytest.approx(1.0)
    with pytest.raises(UltraFluxError, match="non-zero"):
        band_energy_shares(torch.zeros(1, 1, 4, 4))


def _losses(t):
    return {
        "wavelet": lambda p, q: snr_huber_wavelet_loss(p, q, t, **LOSS),
        "spatial": lambda p, q: snr_huber_spatial_loss(p, q, t, **SNR),
        "mse": lambda p, q: (p - q).square().mean(),
    }


@pytest.mark.parametrize("std", [1.0, 2.0])
def test_saturated_low_frequency_errors_shift_the_gradient_to_high_frequencies(std):
    """Correlated residuals above c(t) = 1: the wavelet Huber clips the large LL coefficients, the spatial Huber
    clips pixels (whose error is mostly the same smooth field), so only the wavelet loss rebalances towards HF."""
    t = torch.full((2,), T_KNEE_AT_ONE, dtype=torch.float64)
    residual = correlated_residual(std)
    hf = {name: gradient_shares(loss, residual)[1:].sum().item() for name, loss in _losses(t).items()}
    assert hf["spatial"] == pytest.approx(hf["mse"], abs=0.02)  # measured 0.029 / 0.038 vs 0.024
    assert hf["wavelet"] > 3 * hf["spatial"]  # measured 0.135 (std 1) / 0.270 (std 2)
    smaller = gradient_shares(_losses(t)["wavelet"], correlated_residual(std / 2))[1:].sum().item()
    assert hf["wavelet"] > smaller  # the larger the low-frequency error, the stronger the shift


def test_quadratic_regime_wavelet_and_spatial_huber_agree():
    """Residuals far below c(t): both are ½‖R‖² to first order and W is orthonormal, so values and band shares agree."""
    t = torch.full((2,), T_KNEE_AT_ONE, dtype=torch.float64)
    residual = correlated_residual(0.02)
    losses = _losses(t)
    shares = {name: gradient_shares(loss, residual) for name, loss in losses.items()}
    torch.testing.assert_close(shares["wavelet"], shares["spatial"], rtol=0.02, atol=1e-4)
    torch.testing.assert_close(shares["spatial"], shares["mse"], rtol=0.02, atol=1e-4)
    zero = torch.zeros_like(residual)
    assert losses["wavelet"](residual, zero).item() == pytest.approx(losses["spatial"](residual, zero).item(), rel=2e-3)


def test_band_weights_set_the_gradient_balance_in_the_quadratic_regime():
    """Band k's gradient is w_k·R_k there, so its energy share is w_k²·‖R_k‖² / Σ_j w_j²·‖R_j‖²."""
    t = torch.full((2,), T_KNEE_AT_ONE, dtype=torch.float64)
    residual = correlated_residual(0.02, seed=1)
    weights = (1.0, 2.0, 0.5, 3.0)
    shares = gradient_shares(
        lambda p, q: snr_huber_wavelet_loss(p, q, t, **{**LOSS, "band_weights": weights}), residual
    )
    energy = haar_bands(residual).square().sum(dim=(0, 2, 3, 4)) * torch.tensor(weights, dtype=torch.float64).square()
    torch.testing.assert_close(shares, energy / energy.sum(), rtol=0.02, atol=1e-4)
