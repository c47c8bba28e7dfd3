"""DeepSpeed ZeRO-3 trainer on CPU (gloo): equality with a plain torch loop on one and two ranks, kill-and-resume,
stage chaining, export → generate, and MLflow tracking. Real data modules, real DeepSpeed, real MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ultraflux_model.config import DataConfig, UltraFluxConfig, dump_config
from ultraflux_model.data import stages as data_stages
from ultraflux_model.data.cache import CachedLatentDataset
from ultraflux_model.diffusion.losses import training_loss
from ultraflux_model.errors import UltraFluxError
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.training.curriculum import stage_plans
from ultraflux_model.training.distributed import DistInfo, free_port
from ultraflux_model.training.trainer import (
    BatchStream,
    draw_noise_and_t,
    first_sample_of,
    predict_x0,
    train,
    train_stage,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def cache_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data pipeline on the synthetic set: ingest → score → filter → bucket → shard → cache."""
    root = tmp_path_factory.mktemp("data")
    cfg = DataConfig.model_validate({"root": str(root), "synthetic": {"n": 16}, "cache": {"model": str(tiny_checkpoint),
                                                                                          "max_sequence_length": 8}})
    data_stages.run_ingest(cfg, progress=False)
    data_stages.run_score(cfg, progress=False)
    data_stages.run_filter(cfg)
    data_stages.run_bucket(cfg)
    data_stages.run_shard(cfg, progress=False)
    data_stages.run_cache(cfg, progress=False)
    return root / "cache"


def make_cfg(base: Path, cache: Path, run_dir: Path, stages: list[dict], **train: object) -> UltraFluxConfig:
    return UltraFluxConfig.model_validate({
        "train": {"model": str(base), "cache_dir": str(cache), "run_dir": str(run_dir), "stages": stages,
                  "sample_sizes": [], **train},
        "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db"},
        "data": {"cache": {"max_sequence_length": 8}},
    })


STAGE1 = {"name": "stage1", "steps": 6, "lr": 1e-3, "micro_batch": 2, "global_batch": 4}


Weights = dict[str, torch.Tensor]


def plain_torch_run(cfg: UltraFluxConfig, stage_index: int, world_size: int, steps: int,
                    init_from: Path | None = None) -> tuple[list[float], Weights, Weights]:
    """The same recipe without DeepSpeed: one process plays every rank, gradients averaged over ranks and micro
    batches, torch AdamW and clip_grad_norm_, a full-tensor EMA. Returns (losses, final weights, EMA weights)."""
    train_cfg = cfg.train
    plan = stage_plans(train_cfg)[stage_index]
    st = plan.stage
    model = UltraFluxTransformer2DModel.from_pretrained(init_from or plan.init_from, torch_dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=st.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  weight_decay=train_cfg.weight_decay)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = CachedLatentDataset(train_cfg.cache_dir, subset=None if st.subset == "all" else st.subset)
    accum = st.grad_accum(world_size)
    streams = [BatchStream(dataset, list(range(len(dataset))), st.micro_batch, seed=train_cfg.seed,
                           dist=DistInfo(rank=r, world_size=world_size, local_rank=0, device=torch.device("cpu")),
                           grad_accum=accum)
               for r in range(world_size)]
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            for rank, stream in enumerate(streams):
                batch = stream.next(torch.device("cpu"))
                b = batch["latents"].shape[0]
                noise, t = draw_noise_and_t(tuple(batch["latents"].shape),
                                            first_sample_of(micro, rank, world_size, b), seed=train_cfg.seed,
                                            stage_index=stage_index, step=step, stage=st,
                                            timesteps=train_cfg.timesteps)
                pred, target = predict_x0(model, batch, noise, t, guidance=train_cfg.guidance, dtype=torch.float32)
                loss = training_loss(pred, target, t, cfg=train_cfg.loss, kernel="eager")
                (loss / (accum * world_size)).backward()
                total += loss.item() / (accum * world_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.deepspeed.gradient_clipping)
        optimizer.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p, 1.0 - train_cfg.ema.decay)
        losses.append(total)
    return losses, {k: v.detach() for k, v in model.state_dict().items()}, ema


def plain_torch_losses(cfg: UltraFluxConfig, stage_index: int, world_size: int, steps: int,
                       init_from: Path | None = None) -> list[float]:
    return plain_torch_run(cfg, stage_index, world_size, steps, init_from)[0]


def metrics_losses(path: Path) -> dict[int, float]:
    """step → loss from metrics.jsonl (the last row of a step wins: a resumed run redoes later steps)."""
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def clean_env() -> dict[str, str]:
    """This process's environment without launcher variables (a child must start its own process group)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}


def train_cmd(config_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ultraflux_model.training.commands", "train", "--config", str(config_file), *extra]


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoint: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage 1 on one process with ZeRO-3 from the CPU DeepSpeed JSON in infra/ (6 steps, 2 micro batches)."""
    run_dir = tmp_path_factory.mktemp("one-rank")
    cfg = make_cfg(tiny_checkpoint, cache_dir, run_dir, [STAGE1], checkpoint={"every": 2, "keep_last": 2},
                   deepspeed={"config_file": str(REPO / "infra/deepspeed/zero3_cpu_fp32.json")})
    return cfg, train_stage(cfg, "stage1")


def test_zero3_one_process_matches_plain_torch(one_rank) -> None:
    cfg, result = one_rank
    assert result.steps == list(range(1, 7))
    expected, weights, ema = plain_torch_run(cfg, 0, world_size=1, steps=6)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    # The consolidated exports hold the same trained weights and the same EMA as the plain loop.
    export = Path(cfg.train.run_dir) / "stage1" / "export"
    exported = load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    ema_file = export.with_name("export_ema") / "transformer" / "diffusion_pytorch_model.safetensors"
    exported_ema = load_file(str(ema_file))
    assert exported.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6)
        if name in ema:
            torch.testing.assert_close(exported_ema[name], ema[name], rtol=1e-4, atol=1e-6)
    # keep-last-N and the atomic layout: only complete step folders, the newest two
    checkpoints = Path(cfg.train.run_dir) / "stage1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000006"


def test_zero3_two_ranks_match_plain_torch_and_deepspeed_consolidation(tiny_checkpoint: Path, cache_dir: Path,
                                                                        tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage = {"name": "stage1", "steps": 3, "lr": 1e-3, "micro_batch": 1, "global_batch": 2}
    cfg = make_cfg(tiny_checkpoint, cache_dir, tmp_path / "run", [stage], checkpoint={"every": 3})
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ultraflux_model.training.commands", "train",
           "--config", str(config_file)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stage_dir = tmp_path / "run" / "stage1"
    losses = metrics_losses(stage_dir / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3]
    expected, _, ema = plain_torch_run(cfg, 0, world_size=2, steps=3)
    torch.testing.assert_close(torch.tensor([losses[s] for s in (1, 2, 3)]), torch.tensor(expected),
                               rtol=1e-5, atol=1e-7)
    # The EMA export, all-gathered from the per-rank shards, equals the plain loop's full-tensor EMA.
    exported_ema = load_file(str(stage_dir / "export_ema" / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name, tensor in ema.items():
        torch.testing.assert_close(exported_ema[name], tensor, rtol=1e-4, atol=1e-6)
    # The export gathered from the two ZeRO-3 partitions equals DeepSpeed's own zero_to_fp32 consolidation.
    exported = load_file(str(stage_dir / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(stage_dir / "checkpoints" / "step-00000003"), tag="ds")
    assert exported.keys() == consolidated.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, consolidated[name]), name
    assert len(list((stage_dir / "checkpoints" / "step-00000003").glob("trainer_rank*.pt"))) == 2


def test_killed_run_resumes_to_the_uninterrupted_losses(one_rank, tmp_path: Path) -> None:
    cfg, uninterrupted = one_rank
    run_dir = tmp_path / "run"
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_dir": run_dir})})
    cfg = UltraFluxConfig.model_validate({**cfg.model_dump(mode="json"),
                                          "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db"}})
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(dump_config(cfg))
    latest = run_dir / "stage1" / "checkpoints" / "latest"
    proc = subprocess.Popen(train_cmd(config_file), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not latest.exists():
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-3000:]}"
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert killed_at < 6 and not (run_dir / "stage1" / "DONE").exists()

    with pytest.raises(UltraFluxError, match="--resume"):  # existing checkpoints are never overwritten silently
        train_stage(cfg, "stage1")
    resumed = train_stage(cfg, "stage1", resume=True)
    assert resumed.resumed_from == killed_at and resumed.steps == list(range(killed_at + 1, 7))
    losses = metrics_losses(run_dir / "stage1" / "metrics.jsonl")
    assert [losses[s] for s in range(1, 7)] == uninterrupted.losses
    assert (run_dir / "stage1" / "DONE").exists()


def test_stages_chain_export_generates_and_mlflow_has_the_runs(tiny_checkpoint: Path, cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from ultraflux_model.inference.pipeline import generate

    run_dir = tmp_path / "run"
    stages = [{"name": "stage1", "steps": 2, "lr": 1e-3, "micro_batch": 2, "global_batch": 2},
              {"name": "stage2", "subset": "stage2", "t_min": 0.541, "steps": 2, "lr": 1e-3, "micro_batch": 1,
               "global_batch": 1}]
    cfg = make_cfg(tiny_checkpoint, cache_dir, run_dir, stages, sample_sizes=[[64, 64], [96, 64]], sample_steps=2)
    results = train(cfg)
    assert [r.name for r in results] == ["stage1", "stage2"]

    # Stage 2 starts from stage 1's export: its first loss is the plain loss of those weights.
    plan2 = stage_plans(cfg.train)[1]
    assert plan2.init_from == run_dir / "stage1" / "export" / "transformer"
    first = plain_torch_losses(cfg, 1, world_size=1, steps=1)
    assert results[1].losses[0] == pytest.approx(first[0], rel=1e-5)
    # ... and not from the base checkpoint's weights.
    base_first = plain_torch_losses(cfg, 1, world_size=1, steps=1, init_from=tiny_checkpoint / "transformer")
    assert base_first[0] != pytest.approx(first[0], rel=1e-5)

    # Every stage's values stay in the stage-2 band and the export loads and generates at two aspect ratios.
    export = run_dir / "stage2" / "export"
    trained = UltraFluxTransformer2DModel.from_pretrained(export / "transformer")
    base = UltraFluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values(),
                                                       strict=True))
    assert (run_dir / "stage2" / "export_ema" / "transformer" / "config.json").is_file()
    images = generate(export, ["a red fox"], [(64, 64), (96, 64)], steps=2, dtype="fp32", max_sequence_length=8,
                      out_dir=tmp_path / "gen", progress=False)
    assert [(im.width, im.height) for im in images] == [(64, 64), (96, 64)]

    # MLflow: one run per stage with the resolved config, the training metrics, tags and sample grids.
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"stage1", "stage2"}
    run = runs["stage2"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.loss.gamma"] == "5.0" and run.data.params["world_size"] == "1"
    for key in ("loss", "lr", "grad_norm", "images_per_s", "tokens_per_s", "peak_memory_gb", "step_time_s"):
        assert key in run.data.metrics, key
    assert [k for k in run.data.metrics if k.startswith("loss_t")] and all(
        k in ("loss_t0.50-0.75", "loss_t0.75-1.00") for k in run.data.metrics if k.startswith("loss_t"))
    assert len([m.value for m in client.get_metric_history(run.info.run_id, "loss")]) == 2
    assert {"git_sha", "dvc_data_hash"} <= set(run.data.tags)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples/stage2")]
    assert grids == ["samples/stage2/step0000002_64x64.png", "samples/stage2/step0000002_96x64.png"]

    # A finished run resumes to nothing; re-running it without --resume is refused before any work.
    assert train(cfg, resume=True) == []
    with pytest.raises(UltraFluxError, match="--resume"):
        train(cfg)


def test_unreachable_tracking_server_fails_before_training(tiny_checkpoint: Path, cache_dir: Path,
                                                           tmp_path: Path) -> None:
    cfg = make_cfg(tiny_checkpoint, cache_dir, tmp_path / "run", [STAGE1])
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = UltraFluxConfig.model_validate({**cfg.model_dump(mode="json"), "tracking": {"uri": dead,
                                                                                      "check_timeout_s": 2}})
    with pytest.raises(UltraFluxError, match="unreachable"):
        train_stage(cfg, "stage1")
    assert not (tmp_path / "run" / "stage1").exists()
