"""VAE post-training inputs and report: each training file once (folder or the filter's vae subset), and the
rFID of native-resolution crops."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.vae_post import load_images, rfid_native
from ultraflux_eval.metrics.fidelity import patch_fid
from ultraflux_eval.metrics.inception import TinyFeatureExtractor


def _save(path, seed, size=(80, 96)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_an_ingest_root_counts_each_picture_once(tmp_path):
    a = _save(tmp_path / "ingest" / "images" / "a.png", 0)
    _save(tmp_path / "ingest" / "images" / "b.png", 1)
    (tmp_path / "ingest" / "downloads").mkdir()
    shutil.copyfile(a, tmp_path / "ingest" / "downloads" / "a-download.png")  # same bytes, other name
    copy = tmp_path / "ingest" / "downloads" / "a-download.png"
    images, skipped = load_images(tmp_path / "ingest", min_side=32)
    # name order: downloads/ comes first, so its copy is kept and images/a.png is the duplicate
    assert sorted(img.path.name for img in images) == ["a-download.png", "b.png"]
    assert skipped == {str(a): f"duplicate of {copy}"}


def test_the_vae_subset_parquet_selects_the_training_files(tmp_path):
    _save(tmp_path / "ingest" / "images" / "a.png", 0)
    b = _save(tmp_path / "ingest" / "images" / "b.png", 1)
    (tmp_path / "subsets").mkdir()
    pd.DataFrame({"key": ["b"], "path": ["images/b.png"]}).to_parquet(tmp_path / "subsets" / "vae.parquet")
    images, skipped = load_images(tmp_path / "subsets" / "vae.parquet", min_side=32)
    assert [img.path for img in images] == [b] and skipped == {}
    pd.DataFrame({"key": ["b"]}).to_parquet(tmp_path / "subsets" / "bad.parquet")
    with pytest.raises(UltraFluxError, match="no `path` column"):
        load_images(tmp_path / "subsets" / "bad.parquet", min_side=32)


def test_rfid_compares_native_crops_at_the_same_positions():
    rng = np.random.default_rng(2)
    originals = [rng.integers(0, 256, (160, 224, 3), dtype=np.uint8) for _ in range(3)]
    noisy = [np.clip(o + rng.normal(0, 40, o.shape), 0, 255).astype(np.uint8) for o in originals]
    extractor = TinyFeatureExtractor(seed=0)
    assert rfid_native(originals, originals, extractor, 64) == pytest.approx(0.0, abs=1e-6)
    value = rfid_native(originals, noisy, extractor, 64)
    assert value > 0 and value == pytest.approx(patch_fid(originals, noisy, extractor, 64, 16), rel=1e-9)
    with pytest.raises(UltraFluxError, match="at least 299x299"):
        rfid_native(originals, noisy, extractor, 299)
