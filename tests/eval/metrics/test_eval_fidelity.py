"""FID / patch-FID with an injected extractor, and the paired metrics, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import structural_similarity
from torchmetrics.image.fid import FrechetInceptionDistance
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics import fidelity
from ultraflux_eval.metrics.inception import TinyFeatureExtractor


def images(n: int, h: int, w: int, seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = 128 + 80 * np.sin(xx / rng.uniform(3, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 20))
        rgb = base[..., None] + scale * rng.normal(0, 25, (h, w, 3)) + rng.uniform(-40, 40, 3)
        out.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return out


def reference_fid(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Textbook Fréchet distance with scipy's matrix square root."""
    mu1, mu2 = real_feats.mean(0), fake_feats.mean(0)
    s1, s2 = np.cov(real_feats, rowvar=False), np.cov(fake_feats, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_torchmetrics_and_textbook_on_the_same_features():
    extractor = TinyFeatureExtractor(seed=0)
    real, fake = images(12, 48, 64, 0), images(10, 80, 40, 1, scale=2.0)
    ours = fidelity.fid(real, fake, extractor, side=32, batch_size=5)

    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(torch.stack([fidelity.resize_uint8(x, 32) for x in real]), real=True)
    metric.update(torch.stack([fidelity.resize_uint8(x, 32) for x in fake]), real=False)
    # torchmetrics returns its float64 result cast to the input's float32; we follow torch-fidelity in float64
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6, abs=1e-9)

    with torch.no_grad():
        rf = extractor(torch.stack([fidelity.resize_uint8(x, 32) for x in real])).double().numpy()
        ff = extractor(torch.stack([fidelity.resize_uint8(x, 32) for x in fake])).double().numpy()
    assert ours == pytest.approx(reference_fid(rf, ff), rel=1e-4)
    assert ours > 0


def test_fid_orders_distributions_and_reuses_reference():
    extractor = TinyFeatureExtractor(seed=1)
    real = images(10, 32, 32, 0)
    near, far = images(10, 32, 32, 5), images(10, 32, 32, 6, scale=4.0)
    reference = fidelity.FrechetDistance(extractor, fidelity.fid_inputs(real, 32), batch_size=4)
    d_near, d_far = reference.distance(fidelity.fid_inputs(near, 32)), reference.distance(fidelity.fid_inputs(far, 32))
    assert d_near < d_far
    # reusing the reference statistics gives the same numbers as fresh computations
    assert d_near == pytest.approx(fidelity.fid(real, near, extractor, 32), rel=1e-9)
    assert d_far == pytest.approx(fidelity.fid(real, far, extractor, 32), rel=1e-9)


def test_fid_needs_two_samples():
    extractor = TinyFeatureExtractor()
    with pytest.raises(EvalError, match="at least 2"):
        fidelity.fid(images(1, 32, 32, 0), images(3, 32, 32, 1), extractor, 32)


def test_native_crops_are_unresized_tiles():
    rgb = images(1, 100, 230, 0)[0]
    crops = fidelity.native_crops(rgb, 32, 4)  # 3 x 7 = 21 tiles -> indices 0, 7, 13, 20
    assert [c.shape for c in crops] == [(32, 32, 3)] * 4
    expected = [(0, 0), (1, 0), (1, 6), (2, 6)]
    for crop, (r, c) in zip(crops, expected, strict=True):
        assert np.array_equal(crop, rgb[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32])
    assert len(fidelity.native_crops(rgb, 50, 99)) == 8  # all 2 x 4 tiles when fewer than asked
    with pytest.raises(EvalError, match="at least 128x128"):
        fidelity.native_crops(rgb, 128, 1)


def test_patch_fid_equals_fid_of_the_crops():
    extractor = TinyFeatureExtractor(seed=2)
    real, fake = images(3, 96, 128, 0), images(3, 64, 160, 1, scale=3.0)
    crops_real = [c for x in real for c in fidelity.native_crops(x, 32, 5)]
    crops_fake = [c for x in fake for c in fidelity.native_crops(x, 32, 5)]
    ours = fidelity.patch_fid(real, fake, extractor, side=32, per_image=5)
    assert ours == pytest.approx(fidelity.fid(crops_real, crops_fake, extractor, side=32), rel=1e-9)


def test_psnr_ssim_ms_ssim_against_independent_formulas():
    a, b = images(2, 192, 176, 3)
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    assert fidelity.psnr(a, b) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)
    assert fidelity.psnr(a, a) == float("inf")
    expected = structural_similarity(
        a.astype(np.float64) / 255, b.astype(np.float64) / 255, channel_axis=2, data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    # torchmetrics crops the window border before averaging, skimage does too (same 11-px Gaussian)
    assert fidelity.ssim(a, b) == pytest.approx(expected, abs=2e-3)
    assert fidelity.ssim(a, a) == pytest.approx(1.0)
    assert fidelity.ms_ssim(a, a) == pytest.approx(1.0)
    assert 0 < fidelity.ms_ssim(a, b) < 1
    with pytest.raises(EvalError, match="161"):
        fidelity.ms_ssim(a[:150], b[:150])
    with pytest.raises(EvalError, match="same size"):
        fidelity.psnr(a, b[:100])


def test_lpips_offline_and_loads_local_alexnet_weights():
    from torchvision.models import alexnet

    torch.manual_seed(0)
    state = alexnet(weights=None).state_dict()
    model = fidelity.build_lpips(state)
    assert torch.equal(model.net.slice1._modules["0"].weight, state["features.0.weight"])
    assert torch.equal(model.net.slice5._modules["10"].weight, state["features.10.weight"])
    a, b = images(2, 64, 96, 4)
    assert fidelity.lpips_distance(a, a, model) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.lpips_distance(a, b, model) > 0.0
    with pytest.raises(EvalError, match="lacks"):
        fidelity.build_lpips({"classifier.1.weight": torch.zeros(1)})


# ------------------------------------------------------------------ values, not ranges: independent oracles
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_blur(x: np.ndarray) -> np.ndarray:
    """Separable 11-px Gaussian, 'valid' region only, on ``[C, H, W]`` float64."""
    g = _gaussian_window()
    rows = np.lib.stride_tricks.sliding_window_view(x, g.size, axis=2) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, g.size, axis=1) @ g


def _ssim_and_cs(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term of two ``[C, H, W]`` images in [0, 1] (Wang et al. 2004).

    The convention of torchmetrics (what the paper tables' tooling uses): the SSIM map covers the whole image with
    5-px reflect padding; the cs term only the valid interior (no padded pixel in the window).
    """
    c1, c2 = 0.01**2, 0.03**2
    pad = ((0, 0), (5, 5), (5, 5))
    x, y = np.pad(x, pad, mode="reflect"), np.pad(y, pad, mode="reflect")
    mx, my = _valid_blur(x), _valid_blur(y)
    sxx = np.maximum(_valid_blur(x * x) - mx**2, 0.0)
    syy = np.maximum(_valid_blur(y * y) - my**2, 0.0)
    sxy = _valid_blur(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return float(ssim.mean()), float(cs[:, 5:-5, 5:-5].mean())


def _halve(x: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def reference_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM from the paper: cs at the four finer scales, SSIM at the coarsest, 2×2 mean-pool between scales."""
    x, y = (np.moveaxis(im.astype(np.float64) / 255, 2, 0) for im in (a, b))
    value = 1.0
    for k, beta in enumerate(MS_SSIM_BETAS):
        ssim, cs = _ssim_and_cs(x, y)
        term = ssim if k == len(MS_SSIM_BETAS) - 1 else cs
        value *= max(term, 0.0) ** beta
        x, y = _halve(x), _halve(y)
    return value


def test_ssim_and_ms_ssim_equal_the_textbook_formulas_on_fixed_images():
    a, b = images(2, 192, 176, 3)
    x, y = (np.moveaxis(im.astype(np.float64) / 255, 2, 0) for im in (a, b))
    expected_ssim = _ssim_and_cs(x, y)[0]
    assert fidelity.ssim(a, b) == pytest.approx(expected_ssim, rel=1e-9)
    expected_ms = reference_ms_ssim(a, b)
    assert fidelity.ms_ssim(a, b) == pytest.approx(expected_ms, rel=1e-6)
    # values, not ranges: a mild and a strong degradation of the same image give the oracle's exact numbers
    rng = np.random.default_rng(11)
    mild = np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    strong = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    for other in (mild, strong):
        assert fidelity.ms_ssim(a, other) == pytest.approx(reference_ms_ssim(a, other), rel=1e-6)
    assert fidelity.ms_ssim(a, mild) > fidelity.ms_ssim(a, strong)


def test_psnr_equals_the_formula_on_a_known_error():
    a = images(1, 64, 96, 5)[0]
    b = a.copy()
    b[::2, ::2, 0] = np.where(a[::2, ::2, 0] < 250, a[::2, ::2, 0] + 5, a[::2, ::2, 0] - 5)  # |err| = 5 on 1/12
    mse = (5 / 255) ** 2 / 12
    assert fidelity.psnr(a, b) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)


def test_lpips_equals_the_lpips_package_forward_on_fixed_images():
    import lpips
    from torchvision.models import alexnet

    torch.manual_seed(0)
    model = fidelity.build_lpips(alexnet(weights=None).state_dict())
    a, b = images(2, 64, 96, 4)
    ours = fidelity.lpips_distance(a, b, model)
    with torch.no_grad():
        # the package's own conversion (uint8 HWC → [-1, 1] NCHW) and forward
        direct = float(model(lpips.im2tensor(a), lpips.im2tensor(b)).mean())
        # and the LPIPS formula from its parts: unit-normalised features, squared difference, linear heads,
        # spatial mean, summed over the five layers
        fa = model.net.forward(model.scaling_layer(lpips.im2tensor(a)))
        fb = model.net.forward(model.scaling_layer(lpips.im2tensor(b)))
        total = 0.0
        for lin, u, v in zip(model.lins, fa, fb, strict=True):
            u = u / (u.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            v = v / (v.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += float(lin((u - v) ** 2).mean())
    assert ours == pytest.approx(direct, rel=1e-5)
    assert ours == pytest.approx(total, rel=1e-5)
