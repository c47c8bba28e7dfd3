"""LoRA through the real trainer (DeepSpeed ZeRO-3 on CPU, gloo): only the adapters train and change, the EMA
covers the adapters only, kill-and-resume is exact, stage 2 starts from stage 1's adapters, and 2 ranks equal 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ultraflux.config import UltraFluxConfig
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.lora.adapters import ADAPTER_FILE, META_FILE, read_meta
from ultraflux_model.training.curriculum import stage_plans
from ultraflux_model.training.distributed import free_port
from ultraflux_model.training.trainer import _build_model, lora_base_dtype, train_stage

from tests.model.training.test_training_trainer import (
    clean_env,
    kill_after_first_checkpoint,
    make_cfg,
    metrics_rows,
    stage_dict,
)

pytestmark = pytest.mark.slow
LORA = {"rank": 4, "alpha": 8.0, "targets": "attention_mlp"}
# one rank, 2 micro batches of 1 per step: the same samples and noise as 2 ranks × 1 (trainer docstring)
STAGES = [stage_dict("stage1", 4, micro_batch=1, grad_accum=2, warmup_steps=2),
          stage_dict("stage2", 1, micro_batch=1, grad_accum=2)]


def lora_cfg(base: Path, cache: Path, run_dir: Path, stages: list[dict] = STAGES) -> UltraFluxConfig:
    return make_cfg(base, cache, run_dir, stages, method="lora", lora=LORA, checkpoint={"every": 2, "keep_last": 2})


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_FILE))


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint: Path, training_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = lora_cfg(tiny_checkpoint, training_cache, tmp_path_factory.mktemp("lora-one-rank"))
    return cfg, train_stage(cfg, "stage1")


def test_only_the_adapters_train_and_the_ema_is_theirs(lora_run, tiny_checkpoint: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, result = lora_run
    stage = Path(cfg.train.run_dir) / "stage1"
    assert result.steps == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(result.losses)))
    # The ZeRO-3 checkpoint, consolidated by DeepSpeed itself: the base equals the file it started from bit for bit,
    # every adapter B moved away from its zero start.
    state = get_fp32_state_dict_from_zero_checkpoint(str(stage / "checkpoints" / "step-00000004"), tag="ds")
    base = load_file(str(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    frozen = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k].float()) for k in base), "the frozen base changed"
    assert lora and all(torch.count_nonzero(v) > 0 for k, v in lora.items() if ".lora_B." in k)
    # The export is the adapter folder; its weights are the trained ones.
    exported = adapter(stage / "export")
    assert len(exported) == len(lora)
    for key, tensor in lora.items():
        name = "transformer." + key.replace(".default.weight", ".weight")
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    meta = read_meta(stage / "export")
    assert meta["method"] == "lora" and meta["rank"] == 4 and meta["alpha"] == 8.0
    assert meta["base"] == str(tiny_checkpoint)
    assert len(meta["base_fingerprint"]) == 64
    # The EMA: kept for the adapters only (checkpoint shard), exported as its own adapter folder, and behind the
    # trained weights (decay 0.999 over 4 steps).
    ema_shard = load_file(str(stage / "checkpoints" / "step-00000004" / "ema_rank00000.safetensors"))
    assert set(ema_shard) == set(lora)
    ema = adapter(stage / "export_ema")
    assert ema.keys() == exported.keys() and (stage / "export_ema" / META_FILE).is_file()
    assert any(not torch.equal(ema[k], exported[k]) for k in ema)


def test_stage2_starts_from_stage1_adapters(lora_run) -> None:
    cfg, _ = lora_run
    plan = stage_plans(cfg.train)[1]
    assert plan.init_adapter == Path(cfg.train.run_dir) / "stage1" / "export"
    assert plan.start_marker == plan.init_adapter / META_FILE
    assert plan.init_from == Path(cfg.train.model) / "transformer"
    full = stage_plans(cfg.train.model_copy(update={"method": "full"}))[1]
    assert full.init_adapter is None
    assert full.start_marker == Path(cfg.train.run_dir) / "stage1/export/transformer/config.json"
    model = _build_model(cfg.train, plan, Path(cfg.train.model), {}, torch.device("cpu"))
    exported = adapter(plan.init_adapter)
    params = {"transformer." + n.replace(".default.weight", ".weight"): p for n, p in model.named_parameters()
              if p.requires_grad}
    assert params.keys() == exported.keys()
    assert all(torch.equal(params[k], exported[k]) for k in params)


def test_killed_lora_run_resumes_exactly(lora_run, tmp_path: Path) -> None:
    cfg, uninterrupted = lora_run
    run_dir = tmp_path / "run"
    cfg = lora_cfg(Path(cfg.train.model), cfg.train.cache_dir, run_dir)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(dump_config(cfg))
    kill_after_first_checkpoint(config_file, tmp_path, "--stage", "stage1")
    resumed = train_stage(cfg, "stage1", resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == [3, 4]
    rows = metrics_rows(run_dir / "stage1" / "metrics.jsonl")
    assert [rows[s]["loss"] for s in range(1, 5)] == uninterrupted.losses
    first = Path(lora_run[0].train.run_dir) / "stage1"
    for folder in ("export", "export_ema"):
        a, b = adapter(first / folder), adapter(run_dir / "stage1" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_zero3_lora_on_two_ranks_equals_one(lora_run, tmp_path: Path) -> None:
    cfg1, one = lora_run
    stages = [stage_dict("stage1", 4, micro_batch=1, ranks=2, warmup_steps=2)]
    cfg = lora_cfg(Path(cfg1.train.model), cfg1.train.cache_dir, tmp_path / "run", stages)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ultraflux.train_cli", "train", "--config", str(config_file)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics_rows(tmp_path / "run" / "stage1" / "metrics.jsonl")
    torch.testing.assert_close(torch.tensor([rows[s]["loss"] for s in range(1, 5)]), torch.tensor(one.losses),
                               rtol=1e-5, atol=1e-7)
    for folder in ("export", "export_ema"):
        a, b = adapter(Path(cfg1.train.run_dir) / "stage1" / folder), adapter(tmp_path / "run" / "stage1" / folder)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_base_dtype_refusals(tiny_checkpoint: Path, training_cache: Path, tmp_path: Path) -> None:
    cfg = lora_cfg(tiny_checkpoint, training_cache, tmp_path)
    fp32 = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 3}}
    assert lora_base_dtype(cfg.train, fp32, cuda=False) == "fp32"
    for dtype, match in [("bf16", "training runs in fp32"), ("fp8", "needs a CUDA GPU"), ("nf4", "needs a CUDA GPU")]:
        train = cfg.train.model_copy(update={"lora": cfg.train.lora.model_copy(update={"base_dtype": dtype})})
        with pytest.raises(UltraFluxError, match=match):
            lora_base_dtype(train, fp32, cuda=False)
    nf4 = cfg.train.model_copy(update={"lora": cfg.train.lora.model_copy(update={"base_dtype": "nf4"})})
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UltraFluxError, match="not installed"):
            lora_base_dtype(nf4, fp32, cuda=True)
