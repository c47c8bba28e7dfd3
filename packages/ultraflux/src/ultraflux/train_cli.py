"""``ultraflux train`` and ``ultraflux vae-train``: thin typer commands over the trainers.

One process::

    ultraflux train --config configs/tiny.yaml [--seed 1 --set train.stages.stage2.steps=4 ...] [--resume]

Several ranks (one node, or several nodes with a hostfile; the launchers set RANK/WORLD_SIZE)::

    torchrun --nproc_per_node 2 -m ultraflux.train_cli train --config configs/tiny.yaml
    deepspeed --no_local_rank --num_gpus 8 --hostfile infra/deepspeed/hostfile \\
        --module ultraflux.train_cli train --config configs/4k.yaml

(``--no_local_rank``: ranks read LOCAL_RANK from the environment instead of a ``--local_rank`` argument.)
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from ultraflux_core.options import Options, config_options
from ultraflux_model.config import TrainConfig, VaeTrainConfig

from ultraflux.config import resolve_config

train_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


@train_app.command("train")
@config_options(Options("train", TrainConfig))
def train_command(
    resume: bool = typer.Option(False, help="skip finished stages, continue the interrupted one from its checkpoint"),
    stage: list[str] = typer.Option([], metavar="NAME", help="run only these stages (by name); default: all, in order"),
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Train the DiT through the configured SACL stages with DeepSpeed (ZeRO-3 by default)."""
    from ultraflux_model.training.trainer import train

    results = train(resolve_config(config, overrides), resume=resume, stages=stage or None)
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
@config_options(Options("vae_train", VaeTrainConfig))
def vae_train_command(*, config: list[Path], overrides: list[str]) -> None:
    """Post-train the F16 VAE decoder (encoder frozen) and report reconstruction metrics before/after."""
    from ultraflux_data.vae_post import post_train_vae

    cfg = resolve_config(config, overrides)
    report = post_train_vae(cfg.vae_train, cfg.tracking)
    typer.echo(report.table(), nl=False)
    typer.echo(f"exported {report.export}")


if __name__ == "__main__":  # the entry point for torchrun -m / deepspeed --module
    from ultraflux_core.console import run

    run(train_app)
