"""Synthetic set → ingest → score → filter → bucket → shard → cache, then the cached dataset and sampler."""

from __future__ import annotations

import filecmp
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from ultraflux_core.errors import UltraFluxError
from ultraflux_data import stages
from ultraflux_data.cache import build_caches, model_hash
from ultraflux_data.config import DataConfig
from ultraflux_data.shards import iter_shards
from ultraflux_data.synthetic import write_synthetic_dataset
from ultraflux_model.buckets import BUCKETS
from ultraflux_model.training.latent_cache import CachedLatentDataset, collate_latents
from ultraflux_model.training.sampler import BucketBatchSampler


def test_synthetic_dataset_is_deterministic_and_varied(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", n=12, seed=3, base_side=96)
    b = write_synthetic_dataset(tmp_path / "b", n=12, seed=3, base_side=96)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    records = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    good = [r for r in records if r["file_name"].startswith("img_")]
    assert len(good) == 12 and len({r["aspect_ratio"] for r in good}) == 12
    assert len({r["caption_en"] for r in good}) == 12
    c = write_synthetic_dataset(tmp_path / "c", n=12, seed=4, base_side=96)
    assert not filecmp.cmp(a / "img_0000.png", c / "img_0000.png", shallow=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig.model_validate({
        "root": str(root), "synthetic": {"n": 10, "seed": 0, "base_side": 160},
        "scoring": {"flat_patch": 32},
        "filter": {"min_long_side": 128, "min_short_side": 72, "aesthetics_top": 1.0, "stage2_top": 0.5},
        "shards": {"samples_per_shard": 4},
        "cache": {"model": str(tiny_checkpoint), "max_sequence_length": 8, "batch_size": 3},
    })
    summaries = {
        "ingest": stages.run_ingest(cfg, progress=False),
        "score": stages.run_score(cfg, progress=False),
        "filter": stages.run_filter(cfg),
        "bucket": stages.run_bucket(cfg),
        "shard": stages.run_shard(cfg, progress=False),
        "cache": stages.run_cache(cfg, progress=False),
    }
    return cfg, summaries


def test_stage_counts_and_metrics(pipeline):
    cfg, s = pipeline
    paths = stages.DataPaths(cfg.root)
    assert s["ingest"].total == 10 + 11 and s["ingest"].quarantined == 4  # tiny, truncated, non-image, duplicate
    assert set(s["ingest"].reasons) == {"tiny", "corrupt", "not an image", "duplicate"}
    assert s["score"].images == s["ingest"].ok
    assert s["filter"].passed["flat"] == s["filter"].scored - 1  # only the flat wall is flat
    assert 0 < s["filter"].subsets["train"] == s["shard"].samples == s["cache"].entries
    assert sum(s["bucket"].values()) == s["filter"].subsets["train"]
    assert set(s["bucket"]) == {f"{b.width}x{b.height}" for b in BUCKETS["256"]}
    for stage in ("ingest", "score", "filter", "buckets", "shard", "cache"):
        assert json.loads((paths.metrics / f"{stage}.json").read_text())
    with Image.open(paths.buckets / "histogram.png") as image:
        assert image.format == "PNG"


def test_shards_hold_bucket_sized_images_and_rewrite_identically(pipeline, tmp_path):
    cfg, s = pipeline
    paths = stages.DataPaths(cfg.root)
    samples = list(iter_shards(paths.shards))
    assert len(samples) == s["shard"].samples and s["shard"].shards == len(list(paths.shards.glob("shard-*.tar")))
    assert s["shard"].shards >= -(-len(samples) // 4)  # key ranges: at least samples / samples_per_shard shards
    for sample in samples:
        assert tuple(sample.meta["bucket"]) == sample.image.size and sample.image.mode == "RGB"
        assert sample.meta["caption"]
    with tarfile.open(next(paths.shards.glob("shard-*.tar"))) as tar:
        assert all(m.mtime == 0 and m.isfile() for m in tar.getmembers())
    before = {p.name: p.read_bytes() for p in paths.shards.glob("shard-*.tar")}
    stages.run_shard(cfg, progress=False)
    assert before == {p.name: p.read_bytes() for p in paths.shards.glob("shard-*.tar")}


def test_cache_entries_equal_direct_encoding_and_are_reused(pipeline, tiny_checkpoint):
    cfg, s = pipeline
    paths = stages.DataPaths(cfg.root)
    from ultraflux_data.cache import _load_models
    from ultraflux_model.modules.text_encoders import encode_prompts

    vae, text = _load_models(Path(tiny_checkpoint), "fp32", "cpu")
    dataset = CachedLatentDataset(paths.cache)
    by_key = {dataset[i]["key"]: dataset[i] for i in range(len(dataset))}
    for sample in list(iter_shards(paths.shards))[:3]:
        item = by_key[sample.key]
        w, h = sample.image.size
        assert item["bucket"] == (w, h) and item["latents"].dtype == torch.float32
        assert item["latents"].shape == (16, h // 16, w // 16)
        mean = vae.encode(torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)[None].float() / 127.5 - 1)
        expected = (mean.latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(item["latents"], expected[0], rtol=1e-5, atol=1e-5)
        embeds, pooled = encode_prompts(text, [sample.meta["caption"]], 8, device="cpu", dtype=torch.float32)
        torch.testing.assert_close(item["prompt_embeds"], embeds[0])
        torch.testing.assert_close(item["pooled"], pooled[0])
        assert item["prompt_embeds"].shape == (8, embeds.shape[-1])
    again = stages.run_cache(cfg, progress=False)
    assert again.reused == again.entries and again.encoded == 0 and again.model_hash == s["cache"].model_hash
    assert model_hash(tiny_checkpoint, 16, "fp32") != s["cache"].model_hash  # other text length → other entries


def test_dataset_sampler_and_collate_work_together(pipeline):
    cfg, s = pipeline
    dataset = CachedLatentDataset(stages.DataPaths(cfg.root).cache)
    sampler = BucketBatchSampler(dataset.bucket_keys(), 1, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_latents)
    seen = []
    for batch in loader:
        w, h = batch["bucket"]
        assert batch["latents"].shape == (1, 16, h // 16, w // 16)
        assert batch["pooled"].ndim == 2 and batch["aesthetics"].dtype == torch.float32
        seen += batch["key"]
    assert sorted(seen) == sorted(dataset.index["key"])
    stage2 = CachedLatentDataset(stages.DataPaths(cfg.root).cache, subset="stage2")
    assert 0 < len(stage2) < len(dataset)
    with pytest.raises(UltraFluxError, match="one bucket"):
        collate_latents([{**dataset[0], "bucket": (1, 2)}, {**dataset[0], "bucket": (3, 4)}])


def test_cache_from_a_manifest_and_bad_sources(pipeline, tiny_checkpoint, tmp_path):
    cfg, _ = pipeline
    summary = build_caches(stages.DataPaths(cfg.root).ingest, tiny_checkpoint, tmp_path / "c", max_sequence_length=8,
                           family="256", progress=False)
    assert summary.entries == pipeline[1]["ingest"].ok
    with pytest.raises(UltraFluxError, match="does not exist"):
        build_caches(tmp_path / "nope", tiny_checkpoint, tmp_path / "d", progress=False)
    with pytest.raises(UltraFluxError, match="no vae"):
        build_caches(stages.DataPaths(cfg.root).shards, tmp_path, tmp_path / "d", progress=False)
    with pytest.raises(UltraFluxError, match="run `ultraflux data cache` first"):
        CachedLatentDataset(tmp_path / "empty")


def test_cache_quarantines_a_corrupt_image_without_failing_its_partition(pipeline, tiny_checkpoint, tmp_path):
    import shutil

    import pandas as pd
    from ultraflux_data.config import ComputeConfig
    from ultraflux_data.ingest import read_manifest

    cfg, s = pipeline
    copy = tmp_path / "ingest"
    shutil.copytree(stages.DataPaths(cfg.root).ingest, copy)
    manifest = read_manifest(copy)
    victim = copy / manifest["path"].iloc[0]
    victim.unlink()  # break a hard link before damaging the file
    victim.write_bytes(victim.name.encode())
    summary = build_caches(copy, tiny_checkpoint, tmp_path / "c", max_sequence_length=8, family="256", progress=False,
                           compute=ComputeConfig(partition_size=1000))  # one partition holds every image
    assert summary.quarantined == 1 and summary.entries == s["ingest"].ok - 1
    quarantine = pd.read_parquet(tmp_path / "c" / "quarantine.parquet")
    assert list(quarantine["key"]) == [manifest["key"].iloc[0]] and quarantine["reason"].iloc[0].startswith("corrupt")


def test_cache_quarantines_a_corrupt_image_inside_a_shard_and_goes_on(pipeline, tiny_checkpoint, tmp_path):
    """Issue 19: one corrupt image in a shard aborted the whole cache stage."""
    import io
    import shutil

    import pandas as pd

    cfg, _ = pipeline
    shards = tmp_path / "shards"
    shutil.copytree(stages.DataPaths(cfg.root).shards, shards)
    index = pd.read_parquet(shards / "index.parquet")
    victim = index.iloc[0]
    index = index[index["shard"] == victim["shard"]]  # only the victim's shard: fewer samples to encode
    index.to_parquet(shards / "index.parquet", index=False)
    tar_path = shards / victim["shard"]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    tar_path.unlink()
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name == victim["image"]:
                data = data[:40] + b"\0" * 64  # a header that opens, then garbage where the pixels were
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    summary = build_caches(shards, tiny_checkpoint, tmp_path / "c", max_sequence_length=8, progress=False)
    assert len(index) > 1 and summary.quarantined == 1 and summary.entries == len(index) - 1
    quarantine = pd.read_parquet(tmp_path / "c" / "quarantine.parquet")
    assert list(quarantine["key"]) == [victim["key"]]
    assert quarantine["reason"].iloc[0].startswith(f"corrupt: {victim['shard']}/{victim['image']}")
