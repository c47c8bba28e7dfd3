"""Training flow: one subflow per SACL stage, each starting from the previous stage's export.

Thin: each stage is one call of the library trainer, in this process (``nproc=1``) or through ``torchrun``
for several ranks on this node (multi-node runs use the deepspeed launcher with a hostfile, see
docs/training.md). With ``resume`` finished stages are skipped and an interrupted one continues.

    python -m flows.train_flow --config configs/tiny.yaml [--set train.seed=1] [--resume] [--nproc 2]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ultraflux_core.tracking.uri import check_tracking_reachable
from ultraflux_model.config import resolve_config
from ultraflux_model.errors import UltraFluxError
from ultraflux_model.training.curriculum import StagePlan, stage_plans
from ultraflux_model.training.distributed import free_port
from ultraflux_model.training.trainer import stage_done, train_stage

LAUNCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_command(nproc: int, config: list[str], overrides: list[str], stage: str, resume: bool) -> list[str]:
    """The torchrun command line that trains ``stage`` on ``nproc`` ranks of this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "ultraflux_model.training.commands", "train",
           "--stage", stage]
    for path in config:
        cmd += ["--config", path]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def read_losses(plan: StagePlan) -> dict[int, float]:
    """step → loss of a stage (the last row of a step wins after a resume)."""
    losses: dict[int, float] = {}
    if plan.metrics.is_file():
        for line in plan.metrics.read_text().splitlines():
            row = json.loads(line)
            losses[row["step"]] = row["loss"]
    return losses


@task(name="train-stage")
def run_stage(config: list[str], overrides: list[str], stage: str, resume: bool, nproc: int) -> None:
    if nproc == 1:
        train_stage(resolve_config(config, overrides), stage, resume=resume)
        return
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}  # the launcher sets its own
    proc = subprocess.run(torchrun_command(nproc, config, overrides, stage, resume), env=env)
    if proc.returncode != 0:
        raise UltraFluxError(f"stage {stage} failed on {nproc} ranks (exit {proc.returncode}); see the log above")


@flow(name="ultraflux-train-stage")
def stage_flow(
    config: list[str], overrides: list[str], stage: str, resume: bool = False, nproc: int = 1
) -> dict[str, Any]:
    """One SACL stage: train (or continue) it to its step count, export, summarise."""
    cfg = resolve_config(config, overrides)
    plan = next(p for p in stage_plans(cfg.train) if p.stage.name == stage)
    if plan.index > 0 and not (plan.init_from / "config.json").is_file():
        raise UltraFluxError(f"stage {stage} starts from {plan.init_from}, which does not exist: run the stage before")
    run_stage(config, overrides, stage, resume, nproc)
    losses = read_losses(plan)
    steps = sorted(losses)
    summary = {"stage": stage, "export": str(plan.export), "steps": len(steps),
               "first_loss": losses[steps[0]], "last_loss": losses[steps[-1]]}
    create_markdown_artifact(
        key=f"train-{stage}".lower().replace("_", "-").replace(".", "-"),
        markdown=f"### {stage}\n\n| steps | first loss | last loss | export |\n|---|---|---|---|\n"
        f"| {len(steps)} | {summary['first_loss']:.4f} | {summary['last_loss']:.4f} | `{plan.export}` |\n",
    )
    get_run_logger().info("%s: %d steps, loss %.4f -> %.4f", stage, len(steps), summary["first_loss"],
                          summary["last_loss"])
    return summary


@flow(name="ultraflux-train", log_prints=True)
def train_flow(config: list[str] | None = None, overrides: list[str] | None = None, resume: bool = False,
               nproc: int = 1) -> list[dict[str, Any]]:
    """Every configured SACL stage in order, as subflows; the tracking store is checked before any training."""
    config, overrides = list(config or []), list(overrides or [])
    cfg = resolve_config(config, overrides)
    check_tracking_reachable(cfg.tracking.resolve_uri(cfg.train.run_dir), cfg.tracking.check_timeout_s)
    results = []
    for plan in stage_plans(cfg.train):
        if resume and stage_done(plan):
            print(f"{plan.stage.name}: already finished, skipped")
            continue
        results.append(stage_flow(config, overrides, plan.stage.name, resume=resume, nproc=nproc))
    return results


if __name__ == "__main__":
    import typer

    def main(config: list[str] = typer.Option([]), set_: list[str] = typer.Option([], "--set"),
             resume: bool = typer.Option(False), nproc: int = typer.Option(1)) -> None:
        for row in train_flow(config=config, overrides=set_, resume=resume, nproc=nproc):
            print(row)

    typer.run(main)
