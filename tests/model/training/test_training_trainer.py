"""DeepSpeed ZeRO-3 trainer on CPU (gloo): equality with a plain torch loop on one and two ranks, kill-and-resume,
stage chaining, export → generate, and MLflow tracking. Real data modules, real DeepSpeed, real MLflow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import scipy.special
import torch
from safetensors.torch import load_file
from ultraflux.config import UltraFluxConfig
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.training.curriculum import stage_plans
from ultraflux_model.training.distributed import free_port
from ultraflux_model.training.latent_cache import CachedLatentDataset
from ultraflux_model.training.launch import launch_env
from ultraflux_model.training.trainer import train, train_stage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def cache_dir(training_cache: Path) -> Path:
    """The real data pipeline's cache on the synthetic set (tests/model/conftest.py)."""
    return training_cache


def make_cfg(base: Path, cache: Path, run_dir: Path, stages: list[dict], **train: object) -> UltraFluxConfig:
    return UltraFluxConfig.model_validate({
        "train": {"model": str(base), "cache_dir": str(cache), "run_dir": str(run_dir), "stages": stages,
                  "sample_sizes": [], **train},
        "tracking": {"uri": f"sqlite:///{run_dir}/mlflow.db"},
        "data": {"cache": {"max_sequence_length": 8}},
    })


def stage_dict(name: str, steps: int, *, micro_batch: int, grad_accum: int = 1, ranks: int = 1,
               **extra: object) -> dict:
    """The one place these tests spell a stage's batch fields (renamed configs change only this function).

    ``ranks`` is the world size the stage runs on (the global batch is micro_batch · grad_accum · ranks)."""
    return {"name": name, "steps": steps, "lr": 1e-3, "micro_batch": micro_batch,
            "global_batch": micro_batch * grad_accum * ranks, **extra}


def stage_batch(st, world_size: int) -> tuple[int, int]:  # noqa: ANN001 - a StageConfig
    """(per-rank micro batch, micro batches per optimizer step) of a stage on ``world_size`` ranks."""
    return st.micro_batch, st.global_batch // (st.micro_batch * world_size)


# warm-up makes the logged lr move, so the lr comparison below can fail
STAGE1 = stage_dict("stage1", 6, micro_batch=2, grad_accum=2, warmup_steps=3)


Weights = dict[str, torch.Tensor]


# ---------------------------------------------------------------------- the reference loop, from docs/design.md §3
# Written from the formulas, importing nothing from the trainer or the loss module: only the data order
# (BucketBatchSampler, collate_latents), the model class and the Flux token layout are shared with the code
# under test, plus the documented random-stream protocol (one SeedSequence per sample: a uniform, then ε).


def ref_noise_and_uniform(shape: tuple[int, ...], seed: int, stage: int, step: int,
                          sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample`` is the place in the step's global batch, so every split into ranks × rounds draws the same."""
    state = np.random.SeedSequence([seed, stage, step, sample]).generate_state(2, np.uint64)[0] >> 1
    g = torch.Generator().manual_seed(int(state))
    u = torch.rand((), generator=g, dtype=torch.float64)
    return torch.randn(shape, generator=g), u


def ref_timestep(u: float, cfg, t_min: float, t_max: float) -> float:  # noqa: ANN001 - a TimestepConfig
    """Inverse CDF of the configured law restricted to [t_min, t_max] (on the shifted t), written with scipy."""
    s = cfg.shift

    def unshift(t: float) -> float:
        return t / (s - (s - 1.0) * t)

    def cdf(t: float) -> float:
        if cfg.sampling == "uniform":
            return t
        if t <= 0.0 or t >= 1.0:
            return float(t >= 1.0)
        return float(scipy.special.ndtr((scipy.special.logit(t) - cfg.logit_mean) / cfg.logit_std))

    def icdf(p: float) -> float:
        if cfg.sampling == "uniform":
            return p
        return float(scipy.special.expit(cfg.logit_mean + cfg.logit_std * scipy.special.ndtri(p)))

    lo, hi = cdf(unshift(t_min)), cdf(unshift(t_max))
    base = icdf(lo + (hi - lo) * u)
    return min(max(s * base / (1.0 + (s - 1.0) * base), t_min), t_max)


def ref_haar(x: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal 2-D Haar DWT, sub-bands stacked on channels (order is irrelevant to a mean)."""
    a, b, c, d = x[..., ::2, ::2], x[..., ::2, 1::2], x[..., 1::2, ::2], x[..., 1::2, 1::2]
    return torch.cat([(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], dim=1)


def ref_loss(x0_hat: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, cfg) -> torch.Tensor:  # noqa: ANN001
    """SNR-aware pseudo-Huber wavelet loss, docs/design.md §3, in float64."""
    tc = t.double().clamp(cfg.t_clamp, 1 - cfg.t_clamp)
    snr = ((1 - tc) / tc) ** 2
    capped = torch.minimum(snr, torch.full_like(snr, cfg.gamma))
    omega = tc / (1 - tc) * capped**cfg.beta
    c = (cfg.c_min + (cfg.c_max - cfg.c_min) * (capped / cfg.gamma) ** cfg.alpha).view(-1, 1, 1, 1)
    r = ref_haar(x0_hat.double()) - ref_haar(x0.double())
    per_sample = (c**2 * (torch.sqrt(1 + (r / c) ** 2) - 1)).mean(dim=(1, 2, 3))
    return (omega * per_sample).mean()


class RefRun(NamedTuple):
    losses: list[float]
    grad_norms: list[float]  # before clipping, over all ranks' averaged gradient
    lrs: list[float]  # the optimizer's lr after each step (what the trainer logs)
    weights: Weights
    ema: Weights


def plain_torch_run(cfg: UltraFluxConfig, stage_index: int, world_size: int, steps: int,
                    init_from: Path | None = None) -> RefRun:
    """The recipe in plain torch: one process plays every rank, gradients averaged over ranks and micro batches,
    torch AdamW with a hand-set warm-up lr, clip_grad_norm_, a full-tensor EMA."""
    from ultraflux_model.diffusion.latents import image_ids, pack_latents, text_ids, unpack_latents
    from ultraflux_model.training.latent_cache import collate_latents
    from ultraflux_model.training.sampler import BucketBatchSampler

    train_cfg = cfg.train
    plan = stage_plans(train_cfg)[stage_index]
    st = plan.stage
    micro_batch, accum = stage_batch(st, world_size)
    model = UltraFluxTransformer2DModel.from_pretrained(init_from or plan.init_from, torch_dtype=torch.float32)
    model.train()
    guidance = train_cfg.guidance if model.config.guidance_embeds else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=st.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  weight_decay=train_cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up over warmup_steps optimizer steps, then constant
        return st.lr * (min(1.0, (step + 1) / st.warmup_steps) if st.warmup_steps else 1.0)

    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = CachedLatentDataset(train_cfg.cache_dir, subset=None if st.subset == "all" else st.subset)
    keys = dataset.bucket_keys()
    samplers = [BucketBatchSampler(keys, micro_batch, seed=train_cfg.seed, rank=r, world_size=world_size,
                                   step_batches=accum)
                for r in range(world_size)]
    iters = [iter(s) for s in samplers]

    def next_batch(rank: int) -> dict:
        try:
            positions = next(iters[rank])
        except StopIteration:  # a new epoch, reshuffled
            samplers[rank].set_epoch(samplers[rank].epoch + 1)
            iters[rank] = iter(samplers[rank])
            positions = next(iters[rank])
        return collate_latents([dataset[p] for p in positions])

    out = RefRun([], [], [], {}, {})
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            for rank in range(world_size):
                batch = next_batch(rank)
                z = batch["latents"].float()
                b, _, h, w = z.shape
                # the sampler deals the step's global micro batches round-robin: round `micro` of `rank` is #micro·W+rank
                first = (micro * world_size + rank) * b
                draws = [ref_noise_and_uniform(tuple(z.shape[1:]), train_cfg.seed, stage_index, step, first + i)
                         for i in range(b)]
                eps = torch.stack([d[0] for d in draws])
                t = torch.tensor([ref_timestep(float(d[1]), train_cfg.timesteps, st.t_min, st.t_max) for d in draws],
                                 dtype=torch.float32)
                tt = t.view(b, 1, 1, 1)
                z_t = (1 - tt) * z + tt * eps
                v = model(hidden_states=pack_latents(z_t), encoder_hidden_states=batch["prompt_embeds"],
                          pooled_projections=batch["pooled"], timestep=t, img_ids=image_ids(h // 2, w // 2),
                          txt_ids=text_ids(batch["prompt_embeds"].shape[1]),
                          guidance=None if guidance is None else torch.full((b,), guidance),
                          return_dict=False)[0]
                x0_hat = z_t - tt * unpack_latents(v, h, w)
                loss = ref_loss(x0_hat, z, t, train_cfg.loss)
                (loss / (accum * world_size)).backward()
                total += loss.item() / (accum * world_size)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.deepspeed.gradient_clipping)
        optimizer.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p, 1.0 - train_cfg.ema.decay)
        out.losses.append(total)
        out.grad_norms.append(float(norm))
        out.lrs.append(lr_at(step))  # the lr this step's update used
    out.weights.update({k: v.detach() for k, v in model.state_dict().items()})
    out.ema.update(ema)
    return out


def plain_torch_losses(cfg: UltraFluxConfig, stage_index: int, world_size: int, steps: int,
                       init_from: Path | None = None) -> list[float]:
    return plain_torch_run(cfg, stage_index, world_size, steps, init_from).losses


def metrics_rows(path: Path) -> dict[int, dict]:
    """step → metrics row from metrics.jsonl (the last row of a step wins: a resumed run redoes later steps)."""
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


def assert_matches_reference(rows: dict[int, dict], ref: RefRun) -> None:
    steps = range(1, len(ref.losses) + 1)
    assert sorted(rows) == list(steps)
    for key, expected in (("loss", ref.losses), ("grad_norm", ref.grad_norms), ("lr", ref.lrs)):
        got = torch.tensor([rows[s][key] for s in steps], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-9,
                                   msg=lambda m, key=key: f"{key}: {m}")


def clean_env() -> dict[str, str]:
    """This process's environment without launcher variables (a child must start its own process group)."""
    return launch_env()


# Test harness for the kill: the real CLI in a child whose first completed checkpoint save writes a marker file
# (atomically, by rename) and then blocks until the parent kills it.
PAUSE_AFTER_FIRST_CHECKPOINT = """
import os, runpy, sys, time
from ultraflux_model.training.checkpoint import CheckpointManager
marker = sys.argv[1]
real_save = CheckpointManager.save
def save(self, *args, **kwargs):
    out = real_save(self, *args, **kwargs)
    with open(marker + ".tmp", "w") as fh:
        fh.write(str(out))
    os.replace(marker + ".tmp", marker)
    while True:
        time.sleep(60)
CheckpointManager.save = save
sys.argv = ["ultraflux", *sys.argv[2:]]
runpy.run_module("ultraflux.train_cli", run_name="__main__")
"""


def kill_after_first_checkpoint(config_file: Path, tmp_path: Path, *cli_args: str) -> None:
    """Run ``train --config config_file *cli_args`` in a child and SIGKILL it right after its first checkpoint.

    The event: the child writes the marker once its first checkpoint is complete, then waits to be killed, so the
    kill lands at the same step however slow the machine is (the loop only bounds a hung child; it never decides
    which step the kill hits). The log is a file, not a pipe: a child blocked on a full pipe would never checkpoint.
    """
    marker, log = tmp_path / "first-checkpoint-saved", tmp_path / "train.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_CHECKPOINT, str(marker), "train", "--config",
                                 str(config_file), *cli_args], env=clean_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert marker.exists() and proc.returncode == -signal.SIGKILL, (
        f"no checkpoint before the kill:\n{log.read_text()[-3000:]}"
    )


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
    ref = plain_torch_run(cfg, 0, world_size=1, steps=6)
    weights, ema = ref.weights, ref.ema
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-7)
    assert_matches_reference(metrics_rows(Path(cfg.train.run_dir) / "stage1" / "metrics.jsonl"), ref)
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

    stage = stage_dict("stage1", 3, micro_batch=1, ranks=2, warmup_steps=2)
    cfg = make_cfg(tiny_checkpoint, cache_dir, tmp_path / "run", [stage], checkpoint={"every": 3})
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ultraflux.train_cli", "train",
           "--config", str(config_file)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stage_dir = tmp_path / "run" / "stage1"
    ref = plain_torch_run(cfg, 0, world_size=2, steps=3)
    assert_matches_reference(metrics_rows(stage_dir / "metrics.jsonl"), ref)
    ema = ref.ema
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
    kill_after_first_checkpoint(config_file, tmp_path)
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert killed_at == 2 and not (run_dir / "stage1" / "DONE").exists()

    with pytest.raises(UltraFluxError, match="--resume"):  # existing checkpoints are never overwritten silently
        train_stage(cfg, "stage1")
    resumed = train_stage(cfg, "stage1", resume=True)
    assert resumed.resumed_from == killed_at and resumed.steps == list(range(killed_at + 1, 7))
    rows = metrics_rows(run_dir / "stage1" / "metrics.jsonl")
    assert [rows[s]["loss"] for s in range(1, 7)] == uninterrupted.losses
    assert (run_dir / "stage1" / "DONE").exists()


def test_stages_chain_export_generates_and_mlflow_has_the_runs(tiny_checkpoint: Path, cache_dir: Path,
                                                                 tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from ultraflux_model.inference.pipeline import generate

    run_dir = tmp_path / "run"
    stages = [stage_dict("stage1", 2, micro_batch=2),
              stage_dict("stage2", 2, micro_batch=1, subset="stage2", t_min=0.541)]
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
