"""``ultraflux train`` and ``ultraflux vae-train``: thin typer commands over the trainers.

One process::

    ultraflux train --config configs/tiny.yaml [--set train.seed=1 ...] [--resume] [--stage stage2]

Several ranks (one node, or several nodes with a hostfile; the launchers set RANK/WORLD_SIZE)::

    torchrun --nproc_per_node 2 -m ultraflux_model.training.commands train --config configs/tiny.yaml
    deepspeed --no_local_rank --num_gpus 8 --hostfile infra/deepspeed/hostfile \\
        --module ultraflux_model.training.commands train --config configs/4k.yaml

(``--no_local_rank``: ranks read LOCAL_RANK from the environment instead of a ``--local_rank`` argument.)
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ultraflux_model.config import load_config

train_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


@train_app.command("train")
def train_command(
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order (configs/tiny.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides, e.g. train.seed=1"),
    resume: bool = typer.Option(False, help="skip finished stages, continue the interrupted one from its checkpoint"),
    stage: list[str] = typer.Option([], help="run only these stages (by name); default: all, in order"),
) -> None:
    """Train the DiT through the configured SACL stages with DeepSpeed (ZeRO-3 by default)."""
    from ultraflux_model.training.trainer import train

    cfg = load_config(*config, overrides=set_)
    results = train(cfg, resume=resume, stages=stage or None)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one summary, from rank 0
    for result in results:
        if result.losses:
            typer.echo(
                f"{result.name}: steps {result.steps[0]}..{result.steps[-1]}, loss {result.losses[0]:.4f} -> "
                f"{result.losses[-1]:.4f}, export {result.export}"
            )
        else:
            typer.echo(f"{result.name}: already at its last step, export {result.export}")


@train_app.command("vae-train")
def vae_train_command(
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides, e.g. vae_train.steps=100"),
) -> None:
    """Post-train the F16 VAE decoder (encoder frozen) and report reconstruction metrics before/after."""
    from ultraflux_model.vae.post_training import post_train_vae

    cfg = load_config(*config, overrides=set_)
    report = post_train_vae(cfg.vae_train, cfg.tracking)
    for name in sorted(report.before):
        typer.echo(f"{name:>6}: {report.before[name]:.4f} -> {report.after[name]:.4f}")
    typer.echo(f"exported {report.export}")


if __name__ == "__main__":  # the entry point for torchrun -m / deepspeed --module
    from ultraflux_model.console import run

    run(train_app)
