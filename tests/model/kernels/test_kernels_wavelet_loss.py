"""Fused wavelet-loss Triton kernel vs the pure-torch reference, run on CPU by Triton's interpreter.

TRITON_INTERPRET must be set before Triton kernels are defined, i.e. before the first import of
``ultraflux_model.kernels.wavelet_loss``: hence the assignment above the imports. Only the kernel tests
import the kernel modules at module level, so collection order cannot define them for the GPU first.
The variable stays set for the whole pytest process, so on a machine with CUDA this module runs in a child
process with CUDA hidden (test_kernels_interpreter_on_cuda.py); test_kernels_cuda.py checks the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # run in a child without CUDA by test_kernels_interpreter_on_cuda.py
    pytest.skip("CUDA visible: this module runs in a CUDA-less child (test_kernels_interpreter_on_cuda.py)",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

from ultraflux_core.errors import UltraFluxError  # noqa: E402
from ultraflux_model.config import LossConfig  # noqa: E402
from ultraflux_model.diffusion.losses import haar_bands, snr_huber_spatial_loss, training_loss  # noqa: E402
from ultraflux_model.diffusion.losses import snr_huber_wavelet_loss as reference  # noqa: E402
from ultraflux_model.kernels import wavelet_loss as loss_kernel  # noqa: E402
from ultraflux_model.kernels.wavelet_loss import snr_huber_wavelet_loss as fused  # noqa: E402

from tests.model.loss_fields import T_KNEE_AT_ONE, correlated_residual, gradient_shares  # noqa: E402

# The loss functions take every hyper-parameter (their defaults live only in LossConfig).
LOSS = LossConfig().model_dump()

# Gradients are stored in the input dtype. The interpreter truncates float32 -> bfloat16 where the GPU
# rounds to nearest, so bf16 gradients may differ from the reference's by one bf16 ulp (2^-8 relative).
# float64 inputs: the hyper-parameters (t_clamp, γ, ...) reach the kernel as float32 scalars.
GRAD_TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-9),
    torch.float16: dict(rtol=2e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
}
LOSS_TOL = {torch.float64: dict(rtol=1e-6, atol=0.0)}


@pytest.fixture(params=["interpreter-tiles", "cuda-tiles"])
def tiling(request, monkeypatch):
    """Run with the interpreter's one-big-program tiling and with the CUDA tiling (many programs, partial tiles)."""
    if request.param == "cuda-tiles":
        monkeypatch.setitem(loss_kernel._TILING, "cpu", loss_kernel._TILING["cuda"])
    return request.param


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=gen).to(dtype)
    target = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    t = torch.rand(shape[0], generator=gen)
    t[0] = 0.0  # clamped at the low end
    if shape[0] > 1:
        t[-1] = 1.0  # clamped at the high end
    return pred, target, t


def _both(pred, target, t, **params):
    """Loss and (pred, target) gradients of the kernel and of the reference on identical leaf copies."""
    results = []
    for fn in (fused, reference):
        p = pred.detach().clone().requires_grad_(True)
        q = target.detach().clone().requires_grad_(True)
        loss = fn(p, q, t, **{**LOSS, **params})
        loss.backward()
        results.append((loss.detach(), p.grad, q.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (3, 2, 6, 10), (2, 3, 34, 134)])
def test_fused_loss_matches_reference(shape, dtype, tiling):
    pred, target, t = _inputs(shape, dtype, seed=sum(shape))
    (loss, gp, gq), (ref_loss, ref_gp, ref_gq) = _both(pred, target, t)
    assert loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL.get(dtype, dict(rtol=1e-5, atol=0.0)))
    assert gp.dtype == dtype and gp.is_contiguous()
    torch.testing.assert_close(gp, ref_gp, **GRAD_TOL[dtype])
    torch.testing.assert_close(gq, ref_gq, **GRAD_TOL[dtype])


@pytest.mark.parametrize(
    "params",
    [
        dict(c_min=0.5, c_max=0.5),  # c_max == c_min
        dict(gamma=2.0, alpha=1.0, beta=1.5, c_min=0.05, c_max=3.0, t_clamp=1e-2),
        dict(gamma=50.0, alpha=0.0, beta=0.0),  # zero exponents: x^0 = 1 even where SNR hits the cap
    ],
)
def test_fused_loss_other_parameters_and_extreme_times(params, tiling):
    pred, target, _ = _inputs((4, 2, 8, 6), torch.float32, seed=7)
    t = torch.tensor([1e-6, 0.02, 0.97, 1.0 - 1e-6])
    (loss, gp, _), (ref_loss, ref_gp, _) = _both(pred, target, t, **params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gp, ref_gp, **GRAD_TOL[torch.float32])


def test_fused_loss_accepts_non_contiguous_views(tiling):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(2, 10, 12, 3, generator=gen)
    pred = base.permute(0, 3, 1, 2)  # channels-last storage seen as [B, C, H, W]
    target = torch.randn(2, 3, 20, 12, generator=gen)[:, :, ::2]  # row-strided view, [2, 3, 10, 12]
    t = torch.tensor([0.3, 0.8])
    assert not pred.is_contiguous() and not target.is_contiguous()
    (loss, gp, gq), (ref_loss, ref_gp, ref_gq) = _both(pred, target, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gp, ref_gp, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(gq, ref_gq, **GRAD_TOL[torch.float32])


def test_backward_scales_with_the_incoming_gradient_and_leaves_data_target_alone():
    pred, target, t = _inputs((2, 2, 4, 4), torch.float32, seed=3)
    p = pred.clone().requires_grad_(True)
    (fused(p, target, t, **LOSS) * 3.0).backward()
    r = pred.clone().requires_grad_(True)
    (reference(r, target, t, **LOSS) * 3.0).backward()
    torch.testing.assert_close(p.grad, r.grad, **GRAD_TOL[torch.float32])
    assert target.grad is None


def test_training_loss_dispatches_to_the_kernel_when_forced():
    pred, target, t = _inputs((2, 2, 4, 8), torch.float32, seed=5)
    cfg = LossConfig(gamma=4.0, c_min=0.3)
    forced = training_loss(pred, target, t, cfg=cfg, kernel="triton")
    torch.testing.assert_close(forced, fused(pred, target, t, **cfg.model_dump()), rtol=0, atol=0)
    torch.testing.assert_close(forced, training_loss(pred, target, t, cfg=cfg, kernel="eager"), rtol=1e-5, atol=0)


def test_fused_loss_rejects_bad_inputs():
    with pytest.raises(UltraFluxError, match="even"):
        fused(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 5), torch.zeros(1), **LOSS)
    with pytest.raises(UltraFluxError, match="same shape"):
        fused(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1), **LOSS)
    with pytest.raises(UltraFluxError, match="c_min"):
        fused(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1), **{**LOSS, "c_min": 2.0, "c_max": 1.0})
    with pytest.raises(UltraFluxError, match="empty"):
        fused(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), torch.zeros(0), **LOSS)


def test_fused_backward_passes_gradcheck_in_float64():
    """The kernel's backward against finite differences of its own forward (float64 accumulation)."""
    gen = torch.Generator().manual_seed(13)
    pred = torch.randn(2, 1, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(2, 1, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.tensor([0.05, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p, q: fused(p, q, t, **{**LOSS, "c_min": 0.3}), (pred, target), fast_mode=True
    )


# ---------------------------------------------------------------- band weights and band rebalancing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [(0.5, 2.0, 3.0, 0.25), (1.0, 1.0, 1.0, 4.0)])
def test_fused_band_weights_match_reference(weights, dtype, tiling):
    """Distinct weights per band: a weight applied to the wrong sub-band changes the loss and the gradient."""
    pred, target, t = _inputs((3, 2, 6, 10), dtype, seed=17)
    (loss, gp, gq), (ref_loss, ref_gp, ref_gq) = _both(pred, target, t, band_weights=weights)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL.get(dtype, dict(rtol=1e-5, atol=0.0)))
    # float64: ω, c are float32 in the kernel and unequal band weights no longer cancel in the inverse
    # transform as equal ones do, so a pixel's gradient can be a difference of larger terms (measured 1.7e-6).
    tol = dict(rtol=1e-5, atol=1e-11) if dtype == torch.float64 else GRAD_TOL[dtype]
    torch.testing.assert_close(gp, ref_gp, **tol)
    torch.testing.assert_close(gq, ref_gq, **tol)
    cfg = LossConfig(band_weights=weights)
    torch.testing.assert_close(training_loss(pred, target, t, cfg=cfg, kernel="triton"), loss, rtol=0, atol=0)
    with pytest.raises(UltraFluxError, match="band_weights"):
        fused(pred, target, t, **{**LOSS, "band_weights": (1.0, 0.0, 1.0, 1.0)})


def _fused_shares(residual, **params):
    t = torch.full((residual.shape[0],), T_KNEE_AT_ONE, dtype=residual.dtype)
    return gradient_shares(lambda p, q: fused(p, q, t, **{**LOSS, **params}), residual)


def test_fused_loss_rebalances_bands_like_the_reference():
    """The kernel reproduces both regimes: HF share ≫ the spatial Huber's above c(t), the same shares far below it."""
    t = torch.full((2,), T_KNEE_AT_ONE, dtype=torch.float64)
    spatial = {k: v for k, v in LOSS.items() if k != "band_weights"}
    for std in (0.02, 2.0):
        residual = correlated_residual(std)
        shares = _fused_shares(residual)
        ref = gradient_shares(lambda p, q: reference(p, q, t, **LOSS), residual)
        torch.testing.assert_close(shares, ref, rtol=1e-6, atol=1e-9)
        spatial_hf = gradient_shares(lambda p, q: snr_huber_spatial_loss(p, q, t, **spatial), residual)[1:].sum()
        if std > 1:
            assert shares[1:].sum() > 3 * spatial_hf
        else:
            assert shares[1:].sum().item() == pytest.approx(spatial_hf.item(), rel=0.02)
    weights = (1.0, 2.0, 0.5, 3.0)
    residual = correlated_residual(0.02, seed=1)
    energy = haar_bands(residual).square().sum(dim=(0, 2, 3, 4)) * torch.tensor(weights, dtype=torch.float64).square()
    shares = _fused_shares(residual, band_weights=weights)
    torch.testing.assert_close(shares, energy / energy.sum(), rtol=0.02, atol=1e-4)
