"""Training flow: one subflow per SACL stage, each starting from the previous stage's export.

Thin: the stages to run are the trainer's (``stages_to_run``), each stage is one call of the library trainer, in
this process (``nproc=1``) or on several ranks of this node through ``torchrun`` (multi-node runs: docs/training.md).
With ``resume`` finished stages are skipped and an interrupted one continues.

    python -m flows.train_flow --config configs/tiny.yaml [--set train.seed=1] [--resume] [--nproc 2]
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from ultraflux.config import resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.uri import check_tracking_reachable
from ultraflux_model.training.curriculum import find_stage, stage_plans, stages_to_run
from ultraflux_model.training.launch import run_ranks
from ultraflux_model.training.trainer import train_stage


def train_program(config: list[str], overrides: list[str], stage: str, resume: bool) -> list[str]:
    """``ultraflux train`` for one stage as a module run by torchrun on every rank."""
    args = ["-m", "ultraflux.train_cli", "train", "--stage", stage]
    for path in config:
        args += ["--config", path]
    for item in overrides:
        args += ["--set", item]
    return args + (["--resume"] if resume else [])


@task(name="train-stage")
def run_stage(config: list[str], overrides: list[str], stage: str, resume: bool, nproc: int) -> None:
    if nproc == 1:
        train_stage(resolve_config(config, overrides), stage, resume=resume)
    else:
        run_ranks(nproc, train_program(config, overrides, stage, resume), f"stage {stage}")


@flow(name="ultraflux-train-stage")
def stage_flow(
    config: list[str], overrides: list[str], stage: str, resume: bool = False, nproc: int = 1
) -> dict[str, Any]:
    """One SACL stage: train (or continue) it to its step count, export, summarise."""
    plan = find_stage(resolve_config(config, overrides).train, stage)
    if plan.index > 0 and not plan.start_marker.is_file():
        raise UltraFluxError(f"stage {stage} starts from {plan.start_marker.parent}, which does not exist: run the "
                             "stage before")
    run_stage(config, overrides, stage, resume, nproc)
    losses = plan.losses()
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
               nproc: int = 1, roots: SharedRoots | None = None) -> list[dict[str, Any]]:
    """Every configured SACL stage in order, as subflows; the tracking store is checked before any training.
    ``roots`` moves the run directory (and reads the data cache) onto shared folders (deployments)."""
    config = list(config or [])
    overrides = with_roots(config, overrides, roots)
    cfg = resolve_config(config, overrides)
    check_tracking_reachable(cfg.tracking.resolve_uri(cfg.train.run_dir), cfg.tracking.check_timeout_s)
    pending = stages_to_run(cfg.train, resume=resume)
    for plan in stage_plans(cfg.train):
        if plan not in pending:
            print(f"{plan.stage.name}: already finished, skipped")
    return [stage_flow(config, overrides, plan.stage.name, resume=resume, nproc=nproc) for plan in pending]


if __name__ == "__main__":
    import typer

    def main(config: list[str] = typer.Option([]), set_: list[str] = typer.Option([], "--set"),
             resume: bool = typer.Option(False), nproc: int = typer.Option(1)) -> None:
        for row in train_flow(config=config, overrides=set_, resume=resume, nproc=nproc):
            print(row)

    typer.run(main)
