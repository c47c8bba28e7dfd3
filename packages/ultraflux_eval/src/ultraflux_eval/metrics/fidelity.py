"""Distribution and paired fidelity metrics.

- :func:`fid` — Fréchet distance of whole images brought to the extractor's input side. With the standard
  Inception (:mod:`ultraflux_eval.metrics.inception`) and the ``legacy`` resize this is torch-fidelity's FID to float
  precision (same features, same statistics, same eigenvalue formula); ``clean`` is clean-fid's resize; ``d4k``
  is Diffusion-4K's protocol (short side to the generation size, centre crop, then ``legacy``), which equals
  torchmetrics' ``FrechetInceptionDistance(normalize=False, antialias=False)`` fed Diffusion-4K's crops.
- :func:`patch_fid` — the same on non-overlapping 299×299 crops taken at native resolution (no resize), so 4K
  detail is what gets compared (see docs/evaluation.md for the definition and its sources).
- :func:`psnr`, :func:`ssim`, :func:`ms_ssim`, :func:`lpips_distance` — paired metrics at native resolution
  (reconstruction quality, e.g. VAE decoder before/after post-training).

Images are RGB ``uint8 [H, W, 3]`` arrays (or anything :func:`ultraflux_eval.metrics.scores.load_rgb` reads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.inception import INPUT_SIDE, prepare
from ultraflux_eval.metrics.scores import ImageLike, load_rgb

FidResize = Literal["antialias", "legacy", "clean", "d4k"]
MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-px Gaussian window: the coarsest scale must still hold the window


def to_uint8_tensor(image: ImageLike) -> torch.Tensor:
    """RGB uint8 ``[H, W, 3]`` → ``[3, H, W]`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(load_rgb(image))).permute(2, 0, 1)


def resize_uint8(image: ImageLike, side: int) -> torch.Tensor:
    """Whole image → ``[3, side, side]`` uint8 (bilinear with antialias; aspect ratio is not kept, as in FID)."""
    x = to_uint8_tensor(image).float().unsqueeze(0)
    x = nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).squeeze(0)


def native_crops(image: ImageLike, side: int, count: int) -> list[np.ndarray]:
    """``count`` non-overlapping ``side×side`` crops at native resolution, spread evenly over the full-tile grid.

    Deterministic: tile indices ``round(linspace(0, n_tiles - 1, count))`` in row-major order (all tiles when
    there are fewer than ``count``). Raises ``EvalError`` when the image is smaller than one crop.
    """
    rgb = load_rgb(image)
    rows, cols = rgb.shape[0] // side, rgb.shape[1] // side
    if rows == 0 or cols == 0:
        raise EvalError(f"patch crops need images of at least {side}x{side}, got {rgb.shape[1]}x{rgb.shape[0]}")
    total = rows * cols
    picks = sorted(set(np.round(np.linspace(0, total - 1, min(count, total))).astype(int).tolist()))
    return [rgb[(i // cols) * side : (i // cols + 1) * side, (i % cols) * side : (i % cols + 1) * side] for i in picks]


def _batches(tensors: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for tensor in tensors:
        batch.append(tensor)
        if len(batch) == size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def frechet_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[N, F]`` features → mean ``[F]`` and unbiased covariance ``[F, F]`` in float64 (torch-fidelity's
    ``fid_features_to_statistics``: two-pass ``np.cov`` of the float32 features)."""
    array = features.detach().to(torch.float32).cpu().numpy()
    return np.mean(array, axis=0), np.cov(array, rowvar=False)


def frechet_from_statistics(real: tuple[np.ndarray, np.ndarray], fake: tuple[np.ndarray, np.ndarray]) -> float:
    """``‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Σᵢ Re √λᵢ(Σ₁Σ₂)`` (torch-fidelity's ``fid_statistics_to_metric``: the
    eigenvalue form of ``Tr √(Σ₁Σ₂)``, which stays finite for the rank-deficient covariances of small sets)."""
    (mu1, sigma1), (mu2, sigma2) = real, fake
    diff = mu1 - mu2
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@torch.no_grad()
def extract_features(extractor: nn.Module, inputs: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """``N`` tensors ``[3, S, S]`` (uint8, or float in [0, 255]) → ``[N, F]`` float32 features, in batches."""
    out = [extractor(batch).to(torch.float32).cpu() for batch in _batches(iter(inputs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


class FrechetDistance:
    """FID against a fixed reference set: reference statistics are computed once, then any number of generated
    sets are compared with them. ``extractor`` maps ``[N, 3, S, S]`` → ``[N, F]`` (the standard Inception, or a
    tiny random stand-in in CI); the distance is computed exactly as torch-fidelity computes it."""

    def __init__(self, extractor: nn.Module, real: Sequence[torch.Tensor], batch_size: int = 8) -> None:
        if len(real) < 2:
            raise EvalError(f"FID needs at least 2 reference samples, got {len(real)}")
        self.extractor, self.batch_size = extractor, batch_size
        self.reference = frechet_statistics(extract_features(extractor, real, batch_size))

    def distance(self, fake: Sequence[torch.Tensor]) -> float:
        """FID of ``[3, S, S]`` input tensors against the reference; needs at least 2 samples."""
        if len(fake) < 2:
            raise EvalError(f"FID needs at least 2 generated samples, got {len(fake)}")
        stats = frechet_statistics(extract_features(self.extractor, fake, self.batch_size))
        return frechet_from_statistics(self.reference, stats)


def frechet_distance(
    real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor], extractor: nn.Module, batch_size: int = 8
) -> float:
    """FID between two sets of ``[3, S, S]`` input tensors (at least two each)."""
    return FrechetDistance(extractor, real, batch_size).distance(fake)


def fid_inputs(
    images: Sequence[ImageLike], side: int, resize: FidResize = "antialias", crop_size: int | None = None
) -> list[torch.Tensor]:
    """Whole images → the extractor's input: ``legacy`` / ``clean`` / ``d4k`` give the standard Inception's float
    ``[3, 299, 299]`` (torch-fidelity's, clean-fid's or Diffusion-4K's preprocessing, see
    :mod:`ultraflux_eval.metrics.inception`; ``d4k`` crops at ``crop_size``); ``antialias`` gives uint8
    ``[3, side, side]`` for the tiny CI extractors."""
    if resize == "antialias":
        return [resize_uint8(x, side) for x in images]
    if side != INPUT_SIDE:
        raise EvalError(f"the {resize!r} FID resize is for the standard Inception (side {INPUT_SIDE}), got side {side}")
    return [prepare(load_rgb(x), resize, crop_size) for x in images]


def patch_inputs(images: Sequence[ImageLike], side: int, per_image: int) -> list[torch.Tensor]:
    """Native-resolution crops (:func:`native_crops`) as uint8 ``[3, side, side]`` tensors."""
    return [to_uint8_tensor(c) for image in images for c in native_crops(image, side, per_image)]


def fid(
    real: Sequence[ImageLike],
    fake: Sequence[ImageLike],
    extractor: nn.Module,
    side: int,
    batch_size: int = 8,
    resize: FidResize = "antialias",
    crop_size: int | None = None,
) -> float:
    """FID of whole images brought to ``side×side`` by ``resize`` (299 with ``legacy``/``clean``/``d4k`` for
    Inception; ``d4k`` first crops at ``crop_size``)."""
    return frechet_distance(
        fid_inputs(real, side, resize, crop_size), fid_inputs(fake, side, resize, crop_size), extractor, batch_size
    )


def patch_fid(
    real: Sequence[ImageLike],
    fake: Sequence[ImageLike],
    extractor: nn.Module,
    side: int,
    per_image: int,
    batch_size: int = 8,
) -> float:
    """FID of native-resolution ``side×side`` crops (``per_image`` per image, see :func:`native_crops`)."""
    return frechet_distance(
        patch_inputs(real, side, per_image), patch_inputs(fake, side, per_image), extractor, batch_size
    )


def _paired(a: ImageLike, b: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of the same size → float ``[1, 3, H, W]`` in [0, 1]."""
    x, y = load_rgb(a), load_rgb(b)
    if x.shape != y.shape:
        raise EvalError(f"paired metrics need images of the same size, got {x.shape[:2]} and {y.shape[:2]}")
    return _unit_float(x), _unit_float(y)


def _unit_float(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3] uint8`` → ``[1, 3, H, W] float64`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).double() / 255.0


def psnr(a: ImageLike, b: ImageLike) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (data range 1); ``inf`` for equal images."""
    x, y = _paired(a, b)
    # float64 throughout (torchmetrics' PSNR reduces in float32 and drifts in the 8th digit)
    mse = float(torch.mean((x - y) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: ImageLike, b: ImageLike) -> float:
    """SSIM (Gaussian 11-px window, σ 1.5) at native resolution."""
    x, y = _paired(a, b)
    if min(x.shape[-2:]) < 11:
        raise EvalError(f"SSIM needs both sides >= 11 px, got {x.shape[-1]}x{x.shape[-2]}")
    return float(structural_similarity_index_measure(x, y, data_range=1.0))


def ms_ssim(a: ImageLike, b: ImageLike) -> float:
    """Multi-scale SSIM (5 scales, standard weights) at native resolution; both sides must be >= 161 px."""
    x, y = _paired(a, b)
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        raise EvalError(
            f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIDE} px (5 scales of an 11-px window), "
            f"got {x.shape[-1]}x{x.shape[-2]}; use ssim for smaller images"
        )
    return float(multiscale_structural_similarity_index_measure(x, y, data_range=1.0))


def build_lpips(alexnet_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """LPIPS (AlexNet) without any download: the package's bundled linear heads, plus AlexNet ``features``
    weights from a local state dict (torchvision layout) — or random AlexNet features for CI when None."""
    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=` flag
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if alexnet_state is not None:
        features = {k.removeprefix("features."): v for k, v in alexnet_state.items() if k.startswith("features.")}
        slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
        target = {f"{name}": param for s in slices for name, param in s.named_parameters()}
        missing = sorted(set(target) - set(features))
        if missing:
            raise EvalError(f"AlexNet state dict lacks LPIPS feature weights {missing}")
        for name, param in target.items():
            param.data.copy_(features[name])
    return model.eval()


@torch.no_grad()
def lpips_distance(a: ImageLike, b: ImageLike, model: nn.Module) -> float:
    """LPIPS distance (lower = more similar) at native resolution with an injected LPIPS model."""
    x, y = _paired(a, b)
    return float(model(x.float() * 2 - 1, y.float() * 2 - 1).mean())
