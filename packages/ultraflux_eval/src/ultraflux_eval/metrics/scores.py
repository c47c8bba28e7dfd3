"""Weight-free image scores, exact to their official definitions.

One implementation of each score, shared by the evaluation (DESIGN §4) and the dataset filters (DESIGN §3):

- :func:`flat_percentage` — UltraFlux's flatness filter: share of flat 240×240 grayscale patches.
- :func:`shannon_entropy` — base-2 entropy of the grayscale histogram.
- :func:`resolution` / :func:`aspect_ratio` — pixel size after EXIF orientation.
- :func:`glcm_score` — Diffusion-4K's GLCM score: mean over 64×64 tiles of the entropy of the tile's
  co-occurrence matrices.
- :func:`compression_ratio` — Diffusion-4K's compression ratio: raw RGB bytes over JPEG-q95 bytes, over a set.

Grayscale is OpenCV's fixed-point luminance (the official code reads BGR with ``cv2.imread`` and uses
``COLOR_BGR2GRAY``; on our RGB arrays ``COLOR_RGB2GRAY`` applies the same weights to the same channels, so the
grey values are identical). Every function accepts a path, a ``PIL.Image`` or an RGB ``uint8`` array ``[H, W, 3]``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.stats import entropy as scipy_entropy
from skimage.feature import graycomatrix

from ultraflux_eval.errors import EvalError

ImageLike = str | os.PathLike | Image.Image | np.ndarray

FLAT_PATCH = 240  # official patch side of the flatness filter
FLAT_VARIANCE = 800.0  # a patch whose Sobel gradient-magnitude variance is below this is flat
NO_PATCH_FLAT_PERCENTAGE = 0.0  # an image with no full 240×240 patch: the official get_flat_percentage returns 0.0
_CALCHIST_MAX_PIXELS = 1 << 24  # cv2.calcHist counts in float32: exact up to 2^24 per call
GLCM_TILE = 64  # Diffusion-4K tile side
GLCM_LEVELS = 64  # 256 grey values // 4
GLCM_DISTANCES = (1, 2, 3, 4)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
JPEG_QUALITY = 95

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """``[H, W, 3] uint8``. 16-bit greyscale keeps its high byte (what ``cv2.imread`` does), alpha is dropped."""
    if img.mode in _SIXTEEN_BIT_MODES:
        high = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(high[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # writable (torch.from_numpy warns on read-only buffers)


def load_rgb(image: ImageLike) -> np.ndarray:
    """Read an image as an RGB array ``[H, W, 3] uint8``.

    Files get their EXIF orientation applied (as ``cv2.imread`` does). Arrays must already be RGB ``uint8``
    ``[H, W, 3]`` and are returned as they are (no copy). Raises ``EvalError`` for a missing, unreadable or
    malformed image.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise EvalError(
                f"image arrays must be RGB uint8 of shape [H, W, 3], got {image.dtype} {tuple(image.shape)}; "
                "convert with np.asarray(PIL.Image.open(path).convert('RGB'))"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise EvalError(f"image array is empty: shape {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        with _open_image(image) as opened:
            return _pil_to_rgb(ImageOps.exif_transpose(opened))
    raise EvalError(f"expected an image path, PIL.Image or RGB uint8 array, got {type(image).__name__}")


@contextmanager
def _open_image(path_like: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` whose failures (missing, truncated, not an image, decompression bomb) become ``EvalError``."""
    path = Path(path_like)
    if not path.is_file():
        raise EvalError(f"image file {path} does not exist (or is not a file)")
    try:
        with Image.open(path) as opened:
            yield opened
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise EvalError(f"cannot read image {path}: {err}; re-export it as PNG or JPEG") from err


def to_gray(image: ImageLike) -> np.ndarray:
    """OpenCV luminance ``[H, W] uint8`` (identical to the official BGR read + ``COLOR_BGR2GRAY``)."""
    return cv2.cvtColor(np.ascontiguousarray(load_rgb(image)), cv2.COLOR_RGB2GRAY)


def resolution(image: ImageLike) -> tuple[int, int]:
    """``(width, height)`` in pixels, after EXIF orientation.

    For files only the header is read (no pixel decode), which is what a resolution filter over a large
    dataset needs.
    """
    if isinstance(image, (str, os.PathLike)):
        with _open_image(image) as opened:
            width, height = opened.size
            # EXIF orientations 5-8 rotate by 90°: the displayed image is transposed.
            if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            return int(width), int(height)
    if isinstance(image, Image.Image):
        return int(image.width), int(image.height)
    rgb = load_rgb(image)
    return int(rgb.shape[1]), int(rgb.shape[0])


def aspect_ratio(image: ImageLike) -> float:
    """Width ÷ height (e.g. 2.0 for 2:1, 0.5 for 1:2)."""
    width, height = resolution(image)
    return width / height


def _full_patches(gray: np.ndarray, side: int) -> np.ndarray:
    """Non-overlapping ``side×side`` patches in row-major order, partial edge patches skipped.

    ``gray [H, W]`` → ``[H // side, side, W // side, side]`` (a view, no copy).
    """
    rows, cols = gray.shape[0] // side, gray.shape[1] // side
    return gray[: rows * side, : cols * side].reshape(rows, side, cols, side)


def patch_gradient_variances(gray: np.ndarray, side: int = FLAT_PATCH) -> np.ndarray:
    """Variance of the Sobel gradient magnitude of every full ``side×side`` patch, each filtered on its own.

    ``gray [H, W] uint8`` → ``[(H // side) * (W // side)] float64`` in row-major patch order.

    Equal, value for value, to the official per-patch ``cv2.Sobel(patch, CV_64F, 1, 0)`` / ``(0, 1)`` (OpenCV's
    default border, ``BORDER_REFLECT_101``, applied at each patch's own edge), ``np.sqrt(gx**2 + gy**2)``,
    ``np.var``. Why a loop over patches: each patch (57,600 px) stays in cache through all passes, which measured
    faster on CPU than whole-image batched passes that stream ~130 MB per 4K image several times. Why ``CV_16S``:
    a 3×3 Sobel of 8-bit input is an integer in [-1020, 1020], exact in int16; squares add exactly in int32 and
    convert exactly to float64, so the magnitude is bit-identical to the float64 path at less memory traffic.
    Why preallocated buffers: a fresh 230-460 KB array per step is a fresh ``mmap`` with page faults, which
    measured slower than the arithmetic itself.
    """
    blocks = _full_patches(gray, side)
    rows, _, cols, _ = blocks.shape
    variances = np.empty(rows * cols, dtype=np.float64)
    gx, gy = np.empty((side, side), np.int16), np.empty((side, side), np.int16)
    squared, other = np.empty((side, side), np.int32), np.empty((side, side), np.int32)
    magnitude = np.empty((side, side), np.float64)
    for index in range(rows * cols):
        patch = blocks[index // cols, :, index % cols, :]
        cv2.Sobel(patch, cv2.CV_16S, 1, 0, dst=gx, ksize=3)
        cv2.Sobel(patch, cv2.CV_16S, 0, 1, dst=gy, ksize=3)
        np.multiply(gx, gx, out=squared, dtype=np.int32)
        np.multiply(gy, gy, out=other, dtype=np.int32)
        squared += other
        np.sqrt(squared, out=magnitude, dtype=np.float64)
        variances[index] = np.var(magnitude)
    return variances


def flat_share(gray: np.ndarray, patch: int = FLAT_PATCH, threshold: float = FLAT_VARIANCE) -> float:
    """:func:`flat_percentage` of a grayscale ``[H, W] uint8`` array (no colour conversion)."""
    variances = patch_gradient_variances(gray, patch)
    if variances.size == 0:
        return NO_PATCH_FLAT_PERCENTAGE
    return float(np.count_nonzero(variances < threshold) / variances.size)


def flat_percentage(image: ImageLike, patch: int = FLAT_PATCH, threshold: float = FLAT_VARIANCE) -> float:
    """Share (0..1) of the full non-overlapping ``patch×patch`` grayscale patches whose Sobel gradient-magnitude
    variance is below ``threshold`` (official UltraFlux filter: 240, 800; drop an image when > 0.5).

    An image with no full patch (a side below ``patch``) returns ``NO_PATCH_FLAT_PERCENTAGE`` = 0.0, what the
    official ``get_flat_percentage`` returns (the resolution filter is what drops such small images).
    """
    return flat_share(to_gray(image), patch, threshold)


def gray_histogram(gray: np.ndarray) -> np.ndarray:
    """256-bin histogram ``[256] int64`` of a grayscale ``uint8`` array.

    ``cv2.calcHist`` is ~5× faster than ``np.bincount`` here but returns float32 counts, exact only up to 2^24:
    larger images are counted in row blocks below that and summed as integers.
    """
    rows_per_call = max(1, _CALCHIST_MAX_PIXELS // max(1, gray.shape[1]))
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, gray.shape[0], rows_per_call):
        block = np.ascontiguousarray(gray[start : start + rows_per_call])
        counts += cv2.calcHist([block], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return counts


def gray_entropy(gray: np.ndarray) -> float:
    """:func:`shannon_entropy` of a grayscale ``uint8`` array.

    ``skimage.measure.shannon_entropy`` sorts every pixel (``np.unique``) to count the values and hands the
    counts, in ascending value order, to ``scipy.stats.entropy(base=2)``. The non-zero histogram bins are those
    very counts in that very order (same int64 values), so the result is the same float, without the sort.
    """
    counts = gray_histogram(gray)
    return float(scipy_entropy(counts[counts > 0], base=2))


def shannon_entropy(image: ImageLike) -> float:
    """Base-2 Shannon entropy of the 256-bin grayscale histogram (0 for a constant image, at most 8), equal to
    ``skimage.measure.shannon_entropy`` of the grayscale image."""
    return gray_entropy(to_gray(image))


def flat_and_entropy(image: ImageLike, patch: int = FLAT_PATCH,
                     threshold: float = FLAT_VARIANCE) -> tuple[float, float]:
    """``(flat_percentage, shannon_entropy)`` from one grayscale conversion (what the dataset filter needs)."""
    gray = to_gray(image)
    return flat_share(gray, patch, threshold), gray_entropy(gray)


def matrix_entropy(matrix: np.ndarray) -> float:
    """``skimage.measure.shannon_entropy(matrix)`` (base-2 entropy of the distribution of the array's values),
    value for value, without sorting the zeros.

    A normalised GLCM is mostly zeros (at most 4,032 of each 4,096-entry slice are non-zero) and skimage's
    ``np.unique`` sorts all 65,536 entries. Zero is the smallest value a GLCM holds, so ``np.unique`` lists it
    first: the zero count followed by the counts of the unique non-zero values is the very array skimage passes
    to ``scipy.stats.entropy`` (same values, order and dtype), hence the same float — 2-5× faster on the
    smooth tiles that make up most photographs.
    """
    nonzero = matrix[matrix != 0]
    _, counts = np.unique(nonzero, return_counts=True)
    zeros = matrix.size - nonzero.size
    if zeros:
        counts = np.concatenate([np.array([zeros], dtype=counts.dtype), counts])
    return float(scipy_entropy(counts, base=2))


def glcm_score(image: ImageLike) -> float:
    """Diffusion-4K GLCM score: mean over the full non-overlapping 64×64 tiles of the entropy of each tile's
    grey-level co-occurrence matrices.

    Per tile: grey // 4 (64 levels), ``skimage.feature.graycomatrix`` with distances 1-4 and angles
    0, π/4, π/2, 3π/4, ``levels=64, normed=True, symmetric=False`` → ``[64, 64, 4, 4]``, scored by
    ``skimage.measure.shannon_entropy`` of the whole matrix (computed by :func:`matrix_entropy`, equal value for
    value). Partial edge tiles are skipped, so any aspect ratio works and non-square images are scored on the
    same tile grid. Raises ``EvalError`` below 64×64.
    """
    gray = to_gray(image)
    tiles = _full_patches(gray // 4, GLCM_TILE)
    rows, _, cols, _ = tiles.shape
    if rows == 0 or cols == 0:
        raise EvalError(
            f"glcm_score needs at least one full {GLCM_TILE}x{GLCM_TILE} tile, the image is "
            f"{gray.shape[1]}x{gray.shape[0]}"
        )
    entropies = [
        matrix_entropy(
            graycomatrix(
                np.ascontiguousarray(tiles[r, :, c, :]),
                distances=GLCM_DISTANCES,
                angles=GLCM_ANGLES,
                levels=GLCM_LEVELS,
                symmetric=False,
                normed=True,
            )
        )
        for r in range(rows)
        for c in range(cols)
    ]
    return float(np.mean(entropies))


def jpeg_size(image: ImageLike, quality: int = JPEG_QUALITY) -> int:
    """Bytes of the image saved by PIL as JPEG at ``quality`` (PIL's default chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(load_rgb(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def ratio_from_sizes(raw_bytes: Sequence[int], jpeg_bytes: Sequence[int]) -> float:
    """Σ raw ÷ Σ JPEG bytes: the compression ratio of a set from per-image sizes (lets one encode per image
    serve every grouping, e.g. per aspect ratio and overall)."""
    if len(raw_bytes) == 0 or len(raw_bytes) != len(jpeg_bytes):
        raise EvalError(
            f"compression ratio needs matching, non-empty size lists, got {len(raw_bytes)} and {len(jpeg_bytes)}"
        )
    return sum(raw_bytes) / sum(jpeg_bytes)


def compression_ratio(images: Sequence[ImageLike] | ImageLike) -> float:
    """Diffusion-4K compression ratio of a set: Σ H·W·3 ÷ Σ JPEG-q95 bytes (higher = less compressible detail).

    A single image is a set of one. Raises ``EvalError`` for an empty set.
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise EvalError("compression_ratio needs at least one image")
    rgbs = (load_rgb(image) for image in images)
    raw, compressed = zip(*((rgb.size, jpeg_size(rgb)) for rgb in rgbs), strict=True)
    return ratio_from_sizes(raw, compressed)
