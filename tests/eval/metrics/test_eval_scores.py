"""Weight-free scores against independent, straightforward computations on generated images."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics import scores

# (height, width): square, landscape, portrait, 2.39:1, sides that are not multiples of 240 or 64.
SIZES = [(480, 480), (300, 700), (517, 263), (241, 577), (250, 600), (130, 70)]


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 with flat regions, smooth gradients and noisy regions, so patch scores straddle the thresholds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(xx / (7 + seed)) * np.cos(yy / 11)
    amplitudes = rng.uniform(0, 60, 64)  # per region: from noiseless to heavy noise
    amplitudes[::3] = 0.0
    noise_amp = amplitudes[(xx // 97 + 5 * (yy // 89)) % 64]
    rgb = np.stack([base + noise_amp * rng.standard_normal((height, width)) + shift for shift in (0, 20, -25)], -1)
    rgb[: height // 3, : width // 4] = (200, 180, 90)  # a perfectly flat block
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --- independent references (straightforward loops, as in the official filter / Diffusion-4K code) ---


def ref_gray(rgb: np.ndarray) -> np.ndarray:
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # the official reads BGR with cv2.imread
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def ref_flat_percentage(rgb: np.ndarray) -> float:
    gray = ref_gray(rgb)
    flat = total = 0
    for y in range(0, gray.shape[0] - 240 + 1, 240):
        for x in range(0, gray.shape[1] - 240 + 1, 240):
            patch = gray[y : y + 240, x : x + 240]
            gx = cv2.Sobel(patch, cv2.CV_64F, 1, 0, ksize=3)
            gy = cv2.Sobel(patch, cv2.CV_64F, 0, 1, ksize=3)
            magnitude = np.sqrt(gx**2 + gy**2)
            flat += int(magnitude.var() < 800)
            total += 1
    return flat / total


def ref_patch_variances(gray: np.ndarray) -> list[float]:
    out = []
    for y in range(0, gray.shape[0] - 240 + 1, 240):
        for x in range(0, gray.shape[1] - 240 + 1, 240):
            patch = gray[y : y + 240, x : x + 240].copy()
            gx = cv2.Sobel(patch, cv2.CV_64F, 1, 0)
            gy = cv2.Sobel(patch, cv2.CV_64F, 0, 1)
            out.append(float(np.var(np.sqrt(gx**2 + gy**2))))
    return out


def ref_glcm_entropy(tile: np.ndarray) -> float:
    """Co-occurrence counting written out with numpy shifts (offsets = round(d·sin θ), round(d·cos θ)),
    normalised per (distance, angle), then the entropy of the distribution of the matrix's values."""
    matrices = []
    for angle in (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4):
        for distance in (1, 2, 3, 4):
            dr, dc = round(math.sin(angle) * distance), round(math.cos(angle) * distance)
            h, w = tile.shape
            src = tile[max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
            dst = tile[max(0, dr) : h + min(0, dr), max(0, dc) : w + min(0, dc)]
            counts = np.zeros((64, 64), dtype=np.float64)
            np.add.at(counts, (src.ravel(), dst.ravel()), 1)
            matrices.append(counts / counts.sum())
    values = np.concatenate([m.ravel() for m in matrices])
    _, freq = np.unique(values, return_counts=True)
    p = freq / freq.sum()
    return float(-(p * np.log2(p)).sum())


def ref_glcm_score(rgb: np.ndarray) -> float:
    levels = ref_gray(rgb) // 4
    entropies = [
        ref_glcm_entropy(levels[y : y + 64, x : x + 64])
        for y in range(0, levels.shape[0] - 63, 64)
        for x in range(0, levels.shape[1] - 63, 64)
    ]
    return float(np.mean(entropies))


# --- tests ---


@pytest.mark.parametrize("hw", SIZES)
def test_flat_percentage_matches_per_patch_loop(hw):
    rgb = textured(*hw, seed=hw[0] % 7)
    if min(hw) < 240:
        assert scores.flat_percentage(rgb) == scores.NO_PATCH_FLAT_PERCENTAGE
    else:
        assert scores.flat_percentage(rgb) == ref_flat_percentage(rgb)


def test_patch_variances_are_bitwise_equal_to_per_patch_sobel():
    for seed, (h, w) in enumerate([(720, 960), (500, 1210), (961, 250)]):
        gray = ref_gray(textured(h, w, seed))
        got = scores.patch_gradient_variances(gray)
        assert got.tolist() == ref_patch_variances(gray)


def test_flat_percentage_straddles_threshold():
    """The generated images must produce both flat and detailed patches, or the comparison proves little."""
    gray = ref_gray(textured(960, 1200, 3))
    variances = np.array(ref_patch_variances(gray))
    assert (variances < 800).any() and (variances >= 800).any()
    assert 0.0 < scores.flat_percentage(textured(960, 1200, 3)) < 1.0


def test_flat_and_noise_extremes():
    flat = np.full((480, 720, 3), 90, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (480, 720, 3), dtype=np.uint8)
    assert scores.flat_percentage(flat) == 1.0
    assert scores.flat_percentage(noise) == 0.0


@pytest.mark.parametrize("hw", SIZES)
def test_shannon_entropy_matches_skimage(hw):
    from skimage.measure import shannon_entropy

    rgb = textured(*hw, seed=1)
    assert scores.shannon_entropy(rgb) == pytest.approx(shannon_entropy(ref_gray(rgb), base=2), rel=1e-12)


def test_shannon_entropy_bounds():
    assert scores.shannon_entropy(np.zeros((32, 32, 3), np.uint8)) == 0.0
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # each grey value once
    assert scores.shannon_entropy(ramp) == pytest.approx(8.0, abs=1e-12)


@pytest.mark.parametrize("hw", [(128, 128), (130, 200), (64, 257), (200, 70)])
def test_glcm_score_matches_independent_computation(hw):
    rgb = textured(*hw, seed=2)
    assert scores.glcm_score(rgb) == pytest.approx(ref_glcm_score(rgb), rel=1e-12, abs=1e-12)


def test_glcm_score_orders_detail():
    flat = np.full((128, 128, 3), 50, np.uint8)
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert scores.glcm_score(noise) > scores.glcm_score(textured(128, 128, 0)) > scores.glcm_score(flat)


def test_glcm_rejects_images_below_one_tile():
    with pytest.raises(EvalError, match="64x64"):
        scores.glcm_score(np.zeros((63, 500, 3), np.uint8))


def test_compression_ratio_is_raw_over_jpeg_bytes():
    images = [textured(128, 256, 0), textured(200, 96, 1), textured(64, 64, 2)]
    sizes = []
    for rgb in images:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()))
    raw = sum(rgb.shape[0] * rgb.shape[1] * 3 for rgb in images)
    assert scores.compression_ratio(images) == raw / sum(sizes)
    assert scores.compression_ratio(images[0]) == images[0].size / sizes[0]
    with pytest.raises(EvalError):
        scores.compression_ratio([])


def test_inputs_path_pil_array_agree(tmp_path):
    rgb = textured(300, 500, 4)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    for image in (path, str(path), Image.fromarray(rgb), rgb):
        assert np.array_equal(scores.load_rgb(image), rgb)
        assert scores.resolution(image) == (500, 300)
    assert scores.aspect_ratio(path) == 500 / 300


def test_exif_orientation_is_applied(tmp_path):
    rgb = textured(100, 240, 5)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    assert scores.resolution(path) == (100, 240)
    loaded = scores.load_rgb(path)
    assert loaded.shape == (240, 100, 3)
    # cv2.imread applies the same orientation: the grey values then agree up to JPEG decoder differences
    assert np.abs(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(int) - scores.to_gray(path)).mean() < 2


def test_sixteen_bit_png_keeps_high_byte_like_cv2(tmp_path):
    data = (np.random.default_rng(0).integers(0, 65536, (50, 60))).astype(np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), data)
    assert np.array_equal(scores.load_rgb(path), cv2.imread(str(path))[..., ::-1])


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        scores.load_rgb(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(EvalError, match="cannot read image"):
        scores.flat_percentage(broken)
    truncated = tmp_path / "trunc.png"
    buffer = io.BytesIO()
    Image.fromarray(textured(64, 64, 0)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(EvalError, match="cannot read image"):
        scores.load_rgb(truncated)
    with pytest.raises(EvalError, match="RGB uint8"):
        scores.load_rgb(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(EvalError, match="RGB uint8"):
        scores.load_rgb(np.zeros((8, 8), np.uint8))
    with pytest.raises(EvalError, match="expected an image"):
        scores.load_rgb(42)


def test_matrix_entropy_is_skimage_shannon_entropy_bit_for_bit():
    from skimage.feature import graycomatrix
    from skimage.measure import shannon_entropy

    rng = np.random.default_rng(7)
    tiles = [ref_gray(textured(64, 64, s)) // 4 for s in range(6)]
    tiles += [rng.integers(0, 64, (64, 64), dtype=np.uint8), np.full((64, 64), 5, np.uint8)]
    for tile in tiles:
        glcm = graycomatrix(tile, [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=64, normed=True)
        assert scores.matrix_entropy(glcm) == shannon_entropy(glcm)
    full = np.arange(1, 65, dtype=np.float64).reshape(8, 8)  # no zeros at all
    assert scores.matrix_entropy(full) == shannon_entropy(full)
