"""The Ray engine (tasks and a Ray Data actor pool, 2 workers) gives exactly the outputs of the local engine, and the
cache's GPU-actor code path runs the real-size F16 VAE (random weights, CPU, ``gpus_per_worker=0``).

One local Ray instance for the module (start-up is slow on 2 cores): 2 CPUs, no dashboard, a short temp dir
(Ray's socket paths must stay under ~107 characters), always shut down.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from ultraflux_data import stages
from ultraflux_data.config import ComputeConfig, DataConfig

pytestmark = pytest.mark.slow

RAY = ComputeConfig(engine="ray", workers=2, partition_size=2)
LOCAL = ComputeConfig(engine="local", partition_size=2)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pipeline(root: Path, model: Path, compute: ComputeConfig) -> DataConfig:
    cfg = DataConfig.model_validate({
        "root": str(root), "synthetic": {"n": 8, "seed": 5, "base_side": 128},
        "scoring": {"flat_patch": 32},  # tiny learned scorers on: they run in the actors
        "filter": {"min_long_side": 96, "min_short_side": 64, "aesthetics_top": 1.0, "stage2_top": 0.5},
        "shards": {"samples_per_shard": 2},
        "cache": {"model": str(model), "max_sequence_length": 8, "batch_size": 2},
    })
    stages.run_ingest(cfg, progress=False, compute=compute)
    stages.run_score(cfg, progress=False, compute=compute)
    stages.run_filter(cfg)
    stages.run_bucket(cfg)
    stages.run_shard(cfg, progress=False, compute=compute)
    stages.run_cache(cfg, progress=False, compute=compute)
    return cfg


def test_ray_two_workers_equal_local(ray_instance, tmp_path, tiny_checkpoint):
    # A Ray actor with num_cpus=1 runs torch on one thread; float32 sums (the learned scorers' matmuls, the cache's
    # convolutions) differ in the last bits between 1 and 2 threads, and shards carry the scores. The local run
    # therefore also uses one thread: then every table and shard is byte-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = stages.DataPaths(_pipeline(tmp_path / "local", tiny_checkpoint, LOCAL).root)
    finally:
        torch.set_num_threads(threads)
    on_ray = stages.DataPaths(_pipeline(tmp_path / "ray", tiny_checkpoint, RAY).root)
    tables = ["ingest/manifest.parquet", "scores.parquet", "subsets/selection.parquet", "subsets/train.parquet",
              "subsets/stage2.parquet", "subsets/vae.parquet", "shards/index.parquet", "cache/index.parquet"]
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_parquet(local.root / table), pd.read_parquet(on_ray.root / table))
    scores = pd.read_parquet(on_ray.scores)
    assert scores["qalign_score"].notna().all() and scores["aesthetics_score"].notna().all()
    tars = sorted(p.name for p in local.shards.glob("shard-*.tar"))
    assert len(tars) > 1 and tars == sorted(p.name for p in on_ray.shards.glob("shard-*.tar"))
    assert all((local.shards / t).read_bytes() == (on_ray.shards / t).read_bytes() for t in tars)
    # Cache tensors: the index is identical; tensors are compared to float32 rounding (the VAE's convolutions may pick
    # different kernels in the driver and in an actor).
    for name in pd.read_parquet(local.cache / "index.parquet")["file"]:
        with safe_open(str(local.cache / name), "pt") as a, safe_open(str(on_ray.cache / name), "pt") as b:
            assert a.metadata() == b.metadata() and a.keys() == b.keys()
            for k in a.keys():
                torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), rtol=1e-5, atol=1e-5)


def test_cache_actor_path_runs_the_real_size_vae(ray_instance, tmp_path, tiny_checkpoint):
    """Two 1024² images through the Ray Data actor pool with the real F16 VAE config (random weights)."""
    import numpy as np
    from PIL import Image
    from ultraflux_data.cache import build_caches, encode_images
    from ultraflux_data.ingest import ingest
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model, ignore=shutil.ignore_patterns("vae"))
    torch.manual_seed(0)
    vae = UltraFluxAutoencoderKL().eval()  # the released F16 VAE's architecture: 128-256-512-512, stride 2
    vae.save_pretrained(model / "vae", safe_serialization=True)
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(2)]
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(src / f"{i}.png", compress_level=1)
    ingest(src, tmp_path / "ingest", progress=False)
    summary = build_caches(tmp_path / "ingest", model, tmp_path / "cache", max_sequence_length=8, batch_size=1,
                           family="1k", progress=False,
                           compute=ComputeConfig(engine="ray", workers=1, gpus_per_worker=0.0))
    assert summary.entries == summary.encoded == 2
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    assert set(zip(index["bucket_width"], index["bucket_height"], strict=True)) == {(1024, 1024)}
    with safe_open(str(tmp_path / "cache" / index["file"].iloc[0]), "pt") as fh:
        latents = fh.get_tensor("latents")
    assert latents.shape == (16, 64, 64)  # 1024 / 16: the F16 VAE's stride-2 encoder
    manifest = pd.read_parquet(tmp_path / "ingest" / "manifest.parquet").set_index("key")
    pixels = np.asarray(Image.open(tmp_path / "ingest" / manifest.loc[index["key"].iloc[0], "path"]).convert("RGB"))
    torch.testing.assert_close(latents, encode_images(vae, [pixels])[0], rtol=1e-4, atol=1e-4)
