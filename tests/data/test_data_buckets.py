"""Bucket table, nearest-log-aspect assignment, resize-then-crop, and the bucket batch sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.bucketing import bucket_histogram_png, resize_center_crop
from ultraflux_model.buckets import BUCKETS, Bucket, assign_bucket
from ultraflux_model.training.sampler import BucketBatchSampler


def test_table_sizes_are_token_multiples_near_the_target_area():
    assert len(BUCKETS["4k"]) == 15
    for name in ("4096x4096", "5440x3072", "3072x5440", "6336x2624", "4608x3648"):
        assert Bucket(*map(int, name.split("x"))) in BUCKETS["4k"]
    for family, table in BUCKETS.items():
        assert len(set(table)) == len(table)
        for bucket in table:
            assert bucket.width % 32 == 0 and bucket.height % 32 == 0, (family, bucket)
    for bucket in BUCKETS["4k"]:
        assert abs(bucket.width * bucket.height / 4096**2 - 1) < 0.03


@pytest.mark.parametrize("family", sorted(BUCKETS))
def test_assignment_is_nearest_log_aspect_by_brute_force(family):
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, height = int(rng.integers(64, 9000)), int(rng.integers(64, 9000))
        best = min(abs(math.log(b.width / b.height) - math.log(width / height)) for b in BUCKETS[family])
        got = assign_bucket(width, height, family)
        assert abs(math.log(got.width / got.height) - math.log(width / height)) == pytest.approx(best, abs=1e-12)


def test_assignment_examples_and_errors():
    assert assign_bucket(3840, 2160, "4k") == Bucket(5440, 3072)  # 16:9 → 1.77
    assert assign_bucket(2160, 3840, "4k") == Bucket(3072, 5440)
    assert assign_bucket(1000, 1000, "1k") == Bucket(1024, 1024)
    assert assign_bucket(2390, 1000, "4k") == Bucket(6336, 2624)
    with pytest.raises(UltraFluxError, match="unknown bucket family"):
        assign_bucket(10, 10, "8k")
    with pytest.raises(UltraFluxError, match="positive"):
        assign_bucket(0, 10)


def test_resize_then_centre_crop_keeps_the_centre():
    # A 300x100 image whose middle third is white: a 96x96 bucket must show only that middle third.
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 100:200] = 255
    out = resize_center_crop(Image.fromarray(pixels), (96, 96))
    assert out.size == (96, 96) and out.mode == "RGB"
    arr = np.asarray(out)
    assert arr[:, 3:-3].min() > 200  # Lanczos rings only at the very edge
    # upscaling path: a small image covers the bucket exactly
    small = resize_center_crop(Image.new("L", (20, 10), 128), (64, 32))
    assert small.size == (64, 32) and np.asarray(small).mean() == pytest.approx(128, abs=1)


def test_histogram_png(tmp_path):
    path = bucket_histogram_png({"256x256": 3, "352x192": 0, "192x352": 5}, tmp_path / "h.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100


KEYS = [(256, 256)] * 7 + [(352, 192)] * 5 + [(192, 352)] * 4 + [(384, 160)]


def _all(sampler: BucketBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_batches_hold_one_bucket_and_are_deterministic_per_seed_and_epoch():
    sampler = BucketBatchSampler(KEYS, 2, seed=3)
    first = _all(sampler)
    assert first == _all(BucketBatchSampler(KEYS, 2, seed=3))
    assert len(first) == len(sampler) == 3 + 2 + 2  # drop_last drops each bucket's short tail
    for batch in first:
        assert len(batch) == 2 and len({KEYS[i] for i in batch}) == 1
    flat = [i for b in first for i in b]
    assert len(flat) == len(set(flat))
    sampler.set_epoch(1)
    assert _all(sampler) != first
    assert _all(BucketBatchSampler(KEYS, 2, seed=4)) != first


def test_keep_last_yields_every_index_once():
    batches = _all(BucketBatchSampler(KEYS, 3, seed=0, drop_last=False))
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    assert all(len({KEYS[i] for i in b}) == 1 for b in batches)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_equal_shares(drop_last):
    world = 3
    per_rank = [_all(BucketBatchSampler(KEYS, 2, seed=1, rank=r, world_size=world, drop_last=drop_last))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    single = _all(BucketBatchSampler(KEYS, 2, seed=1, drop_last=drop_last))
    if drop_last:
        seen = [tuple(b) for p in per_rank for b in p]
        assert len(seen) == len(set(seen))  # no batch on two ranks
        assert set(seen) <= {tuple(b) for b in single}
    else:  # wrapped to a multiple of world_size: every batch of the epoch appears
        assert {tuple(b) for b in single} <= {tuple(b) for p in per_rank for b in p}


def test_state_dict_resumes_the_identical_order():
    full = BucketBatchSampler(KEYS, 2, seed=7)
    full.set_epoch(2)
    expected = _all(full)
    interrupted = BucketBatchSampler(KEYS, 2, seed=7)
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    head = [next(iterator) for _ in range(3)]
    state = interrupted.state_dict()
    resumed = BucketBatchSampler(KEYS, 2, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # same epoch: position kept
    assert head + _all(resumed) == expected
    resumed.set_epoch(3)
    assert resumed.state_dict()["position"] == 0
    with pytest.raises(UltraFluxError, match="batch_size"):
        BucketBatchSampler(KEYS, 4, seed=7).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(UltraFluxError):
        BucketBatchSampler(KEYS, 0, seed=0)
    with pytest.raises(UltraFluxError):
        BucketBatchSampler(KEYS, 2, seed=0, rank=2, world_size=2)
