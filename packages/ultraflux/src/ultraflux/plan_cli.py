"""``ultraflux plan``: the memory and time plan of a training run (see ``ultraflux_model.training.plan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from ultraflux_core.options import Options, config_options
from ultraflux_model.config import TrainConfig

from ultraflux.config import UltraFluxConfig, resolve_config


def plan_config(cfg: UltraFluxConfig, **settings: Any) -> dict[str, Any]:
    """The plan of the run ``cfg`` describes: its training section on its data's largest bucket and text length."""
    from ultraflux_model.training.plan import plan_run

    return plan_run(cfg.train, bucket_family=cfg.data.buckets.family, text_tokens=cfg.data.cache.max_sequence_length,
                    **settings)


@config_options(Options("train", TrainConfig, include=("model", "gradient_checkpointing")))
def plan_command(
    gpus: int = typer.Option(8, help="GPUs per node"),
    nodes: int = typer.Option(1, help="nodes"),
    gpu_memory_gb: float = typer.Option(80.0, help="memory of one GPU (GB, 1e9 bytes)"),
    reserve_gb: float = typer.Option(3.0, help="per GPU for the CUDA context, NCCL buffers and fragmentation"),
    mfu: float = typer.Option(0.4, help="assumed model FLOPs utilisation for the time estimate"),
    peak_tflops: float = typer.Option(989.0, help="dense bf16 peak of one GPU (H100/H200 SXM: 989)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Parameter count, per-GPU memory by ZeRO stage, activations at the largest bucket, fit and time."""
    from ultraflux_model.training.plan import format_plan

    plan = plan_config(resolve_config(config, overrides), gpus=gpus, gpu_memory_gb=gpu_memory_gb, nodes=nodes,
                       reserve_gb=reserve_gb, mfu=mfu, peak_tflops=peak_tflops)
    typer.echo(json.dumps(plan, indent=2) if as_json else format_plan(plan))
