"""The fast weight-free dataset scores equal the official computations value for value."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import shannon_entropy as skimage_entropy
from test_eval_scores import ref_flat_percentage, ref_gray, textured
from ultraflux_eval.metrics import scores


@pytest.mark.parametrize("hw", [(480, 720), (517, 263), (250, 600)])
def test_flat_and_entropy_equal_official_per_patch_sobel_and_skimage(hw):
    rgb = textured(*hw, seed=hw[1] % 5)
    flat, entropy = scores.flat_and_entropy(rgb)
    assert flat == ref_flat_percentage(rgb)
    assert entropy == skimage_entropy(ref_gray(rgb))  # same float, not approximately
    assert (flat, entropy) == (scores.flat_percentage(rgb), scores.shannon_entropy(rgb))


def test_no_full_patch_is_official_zero():
    rgb = textured(239, 900, seed=1)
    assert scores.flat_percentage(rgb) == 0.0 == scores.NO_PATCH_FLAT_PERCENTAGE


def test_histogram_counts_in_blocks_stay_exact(monkeypatch):
    gray = np.random.default_rng(0).integers(0, 256, (301, 97), dtype=np.uint8)
    whole = scores.gray_histogram(gray)
    monkeypatch.setattr(scores, "_CALCHIST_MAX_PIXELS", 1000)  # forces 31 row blocks of 10 rows
    assert scores.gray_histogram(gray).tolist() == whole.tolist() == np.bincount(gray.ravel(), minlength=256).tolist()
