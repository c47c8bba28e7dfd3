"""Pure pieces of the trainer: timestep laws and bands, seeds, DeepSpeed config files, EMA, flattened params."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ultraflux.config import UltraFluxConfig
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.lineage import dvc_output_md5
from ultraflux_core.tracking.runs import flatten
from ultraflux_model.config import DeepSpeedConfig, StageConfig, TimestepConfig, TrainConfig
from ultraflux_model.training.curriculum import stage_plans
from ultraflux_model.training.ema import ShardedEma
from ultraflux_model.training.timesteps import sample_timesteps, shift_timesteps, unshift_timesteps
from ultraflux_model.training.trainer import deepspeed_config, sample_seed

REPO = Path(__file__).resolve().parents[3]


def test_shift_is_inverted_and_matches_the_flowmatch_formula() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(unshift_timesteps(shift_timesteps(t, 3.0), 3.0), t)
    # diffusers' FlowMatchEulerDiscreteScheduler static shift: s·σ / (1 + (s−1)·σ)
    assert float(shift_timesteps(torch.tensor(0.5, dtype=torch.float64), 3.0)) == pytest.approx(0.75)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_band_restriction_equals_rejection_sampling(sampling: str, shift: float) -> None:
    """Inverse-CDF sampling in the band has the law of the unrestricted samples that fall in the band."""
    cfg = TimestepConfig(sampling=sampling, shift=shift, logit_mean=0.2, logit_std=0.8)
    band = sample_timesteps(40_000, cfg, 0.541, 1.0, generator=torch.Generator().manual_seed(0))
    assert float(band.min()) >= 0.541 and float(band.max()) <= 1.0
    free = sample_timesteps(200_000, cfg, generator=torch.Generator().manual_seed(1))
    kept = free[free >= 0.541]
    grid = torch.linspace(0.55, 0.99, 45)
    ecdf = lambda x: (x[None, :] <= grid[:, None]).double().mean(dim=1)  # noqa: E731
    assert float((ecdf(band) - ecdf(kept)).abs().max()) < 0.02  # KS distance (critical value ~0.008 at α=0.01)


def test_uniform_law_is_uniform() -> None:
    t = sample_timesteps(50_000, TimestepConfig(sampling="uniform"), generator=torch.Generator().manual_seed(0))
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    assert float((t < 0.25).double().mean()) == pytest.approx(0.25, abs=0.01)


def test_sample_seeds_are_distinct_per_sample_and_reproducible() -> None:
    seeds = {sample_seed(0, stage, step, sample) for stage in range(2) for step in range(10) for sample in range(8)}
    assert len(seeds) == 2 * 10 * 8
    assert sample_seed(0, 1, 2, 4) == sample_seed(0, 1, 2, 4) != sample_seed(1, 1, 2, 4)


@pytest.mark.parametrize("name", ["zero3_cpu_fp32.json", "zero3_gpu_bf16.json"])
def test_deepspeed_json_files_get_their_auto_batch_keys(name: str) -> None:
    stage = StageConfig(micro_batch=3, global_batch=24)
    config = deepspeed_config(DeepSpeedConfig(config_file=REPO / "infra" / "deepspeed" / name), stage, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] is name.endswith("bf16.json")


def test_deepspeed_json_with_conflicting_batch_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(UltraFluxError, match="auto"):
        deepspeed_config(DeepSpeedConfig(config_file=path), StageConfig(micro_batch=2), world_size=1)


def test_generated_deepspeed_config_is_fp32_zero3_on_cpu() -> None:
    config = deepspeed_config(DeepSpeedConfig(), StageConfig(micro_batch=2, global_batch=4), world_size=2)
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"]["enabled"] is torch.cuda.is_available()
    assert config["train_batch_size"] == 4


def test_stage_config_validation() -> None:
    with pytest.raises(ValueError, match="t_min"):
        StageConfig(t_min=0.6, t_max=0.5)
    with pytest.raises(ValueError, match="unique"):
        TrainConfig(stages=(StageConfig(name="a"), StageConfig(name="a")))
    with pytest.raises(ValueError, match="multiples of 32"):
        TrainConfig(sample_sizes=((60, 64),))


def test_stages_chain_through_exports(tmp_path: Path) -> None:
    cfg = TrainConfig(model=str(tmp_path / "base"), run_dir=tmp_path / "run")
    first, second = stage_plans(cfg)
    assert first.init_from == tmp_path / "base" / "transformer"
    assert second.init_from == tmp_path / "run" / "stage1" / "export" / "transformer"
    assert second.stage.subset == "stage2" and second.band == (0.541, 1.0)


def test_ema_tracks_the_weights_and_exports_full_tensors() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = ShardedEma(layer, decay=0.75)  # not 0.5: decay and 1 − decay must be told apart
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(2.0)
    ema.update()
    full = ema.full_tensors(is_main=True)
    torch.testing.assert_close(full["weight"], original + 0.25 * 2.0)  # shadow ← 0.75·shadow + 0.25·weights
    assert full.keys() == {"weight", "bias"} and ema.full_tensors(is_main=False) == {}
    torch.testing.assert_close(layer.weight, original + 2.0)  # the module itself is untouched


def test_flatten_and_dvc_output_md5(tmp_path: Path) -> None:
    params = flatten(UltraFluxConfig().model_dump(mode="json"))
    assert params["train.loss.gamma"] == "5.0" and params["train.deepspeed.zero_stage"] == "3"
    lock = tmp_path / "dvc.lock"
    lock.write_text("stages:\n  cache:\n    outs:\n    - path: artifacts/data/cache\n      md5: abc.dir\n")
    assert dvc_output_md5(Path("artifacts/data/cache"), lock) == "abc.dir"
    assert dvc_output_md5(Path("elsewhere"), lock) == "untracked"
    assert dvc_output_md5(Path("artifacts/data/cache"), tmp_path / "missing.lock") == "untracked"


def test_dvc_data_hash_is_the_lock_md5_else_the_cache_index_content(tmp_path: Path) -> None:
    import hashlib

    from ultraflux_core.tracking.lineage import dvc_data_hash
    from ultraflux_model.training.latent_cache import INDEX

    lock = tmp_path / "dvc.lock"
    lock.write_text(f"stages:\n  cache:\n    outs:\n    - path: {tmp_path / 'tracked'}\n      md5: abc.dir\n")
    assert dvc_data_hash(tmp_path / "tracked", INDEX, lock) == "abc.dir"  # the `dvc repro` path
    cache = tmp_path / "cache"
    assert dvc_data_hash(cache, INDEX, lock) == "none"  # no data at all
    cache.mkdir()
    (cache / INDEX).write_bytes(b"index v1")
    first = dvc_data_hash(cache, INDEX, lock)  # the Prefect path: no dvc.lock entry, the index's content
    assert first == "sha256:" + hashlib.sha256(b"index v1").hexdigest()
    (cache / INDEX).write_bytes(b"index v2")
    assert dvc_data_hash(cache, INDEX, lock) != first  # changes with the data


def test_numpy_and_python_rng_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    import random

    from ultraflux_model.training.checkpoint import rng_state, set_rng_state

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_dvc_training_stages_depend_on_the_cache_and_the_base_model(tmp_path: Path) -> None:
    """``dvc.yaml``'s training stages resolve against params.yaml and hang off the data and model stages."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "preset.yaml", tmp_path / "preset.yaml")  # the preset every stage layers (config stage)
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)

    def upstream(stage: str) -> set[str]:
        out = subprocess.run([dvc, "dag", "--md", stage], cwd=tmp_path, env=env, capture_output=True, text=True,
                             check=True).stdout
        names = dict(line.strip().split("[", 1) for line in out.splitlines() if '["' in line)
        edges = [line.strip().split("-->") for line in out.splitlines() if "-->" in line]
        return {names[a].strip('"]') for a, b in edges if names[b].strip('"]') == stage}

    assert upstream("train") == {"config", "data_cache", "tiny_model"}
    assert upstream("vae_post_train") == {"config", "data_ingest", "tiny_model"}
