"""Global batch semantics: the same global batch split as 1 rank × 2 accumulation rounds, 2 ranks × 1 (one node)
and 2 loopback "nodes" × 1 rank (torchrun c10d rendezvous) gives the same losses, weights and EMA.

Real DeepSpeed ZeRO-3 on gloo, the real data pipeline's cache, the real CLI entry point; the model is tiny.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ultraflux.config import UltraFluxConfig
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import StageConfig
from ultraflux_model.training.distributed import free_port
from ultraflux_model.training.launch import launch_env
from ultraflux_model.training.sampler import BucketBatchSampler

STEPS = 4


def test_accumulation_is_derived_from_the_world_size_and_refused_when_it_does_not_divide() -> None:
    stage = StageConfig(name="s", micro_batch=2, global_batch=64)
    assert [stage.grad_accum(n) for n in (1, 2, 8, 32)] == [32, 16, 4, 1]
    with pytest.raises(UltraFluxError, match=r"global_batch 64 is not a multiple of micro_batch 2 x 3 ranks = 6.*"
                                             r"train\.stages\.s\.global_batch.*\[1, 2, 4, 8, 16, 32\]"):
        stage.grad_accum(3)
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        StageConfig(micro_batch=3, global_batch=64)


def test_every_split_of_a_global_batch_sees_the_same_batches_per_step_across_epochs() -> None:
    keys = ["a"] * 7 + ["b"] * 6 + ["c"] * 4  # 17 batches of 1: an epoch is not a whole number of steps of 4
    per_step = 4

    def steps(world_size: int, rounds: int, epochs: int = 3) -> list[list[int]]:
        samplers = [BucketBatchSampler(keys, 1, seed=5, rank=r, world_size=world_size, step_batches=rounds)
                    for r in range(world_size)]
        out = []
        for epoch in range(epochs):
            for s in samplers:
                s.set_epoch(epoch)
            per_rank = [list(s) for s in samplers]
            for i in range(0, len(per_rank[0]), rounds):  # one optimizer step: `rounds` batches from each rank
                out.append(sorted(b[0] for batches in per_rank for b in batches[i : i + rounds]))
        return out

    one_rank = steps(1, per_step)
    assert len(one_rank) == 3 * (17 // per_step) and all(len(step) == per_step for step in one_rank)
    assert steps(2, per_step // 2) == steps(4, 1) == one_rank


def _config_file(tiny_checkpoint: Path, cache_dir: Path, run_dir: Path) -> Path:
    cfg = UltraFluxConfig.model_validate({
        "train": {"model": str(tiny_checkpoint), "cache_dir": str(cache_dir), "run_dir": str(run_dir),
                  "sample_sizes": [], "checkpoint": {"every": 100},
                  "stages": [{"name": "stage1", "steps": STEPS, "lr": 1e-3, "micro_batch": 1, "global_batch": 2}]},
        "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db"},
        "data": {"cache": {"max_sequence_length": 8}},
    })
    path = run_dir.with_suffix(".yaml")
    path.write_text(dump_config(cfg))
    return path


def _train(config_file: Path) -> list[str]:
    return ["-m", "ultraflux.train_cli", "train", "--config", str(config_file)]


def _run_all(commands: list[list[str]]) -> None:
    """Start every command (the processes of one run), wait for all, fail with the stderr of any that failed."""
    env = launch_env()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-4000:]


def _outcome(run_dir: Path) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    return ([r["loss"] for r in rows], load_file(str(run_dir / "stage1" / "export" / weights)),
            load_file(str(run_dir / "stage1" / "export_ema" / weights)))


@pytest.mark.slow
def test_one_rank_with_accumulation_two_ranks_and_two_nodes_agree(tiny_checkpoint: Path, training_cache: Path,
                                                                  tmp_path: Path) -> None:
    py, torchrun = [sys.executable], [sys.executable, "-m", "torch.distributed.run"]
    runs = {name: tmp_path / name for name in ("one_rank_accum2", "two_ranks", "two_nodes")}
    files = {name: _config_file(tiny_checkpoint, training_cache, path) for name, path in runs.items()}
    _run_all([py + _train(files["one_rank_accum2"])])
    _run_all([torchrun + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          *_train(files["two_ranks"])]])
    endpoint = f"127.0.0.1:{free_port()}"
    _run_all([torchrun + ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
                          "--rdzv_endpoint", endpoint, "--rdzv_id", "global-batch-test", *_train(files["two_nodes"])]
              for node in (0, 1)])

    reference_losses, reference_weights, reference_ema = _outcome(runs["one_rank_accum2"])
    assert len(reference_losses) == STEPS
    base = load_file(str(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], reference_weights[k]) for k in base)  # training moved the weights
    for name in ("two_ranks", "two_nodes"):
        losses, weights, ema = _outcome(runs[name])
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-6, atol=1e-8)
        assert weights.keys() == reference_weights.keys() == ema.keys()
        for key in reference_weights:
            torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ema[key], reference_ema[key], rtol=1e-5, atol=1e-7)
