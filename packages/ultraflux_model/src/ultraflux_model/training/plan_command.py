"""``ultraflux plan``: the memory and time plan of a training run (see ``training/plan.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ultraflux_model.config import resolve_config


def plan_command(
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides"),
    gpus: int = typer.Option(8, help="GPUs per node"),
    nodes: int = typer.Option(1, help="nodes"),
    gpu_memory_gb: float = typer.Option(80.0, help="memory of one GPU (GB, 1e9 bytes)"),
    reserve_gb: float = typer.Option(3.0, help="per GPU for the CUDA context, NCCL buffers and fragmentation"),
    mfu: float = typer.Option(0.4, help="assumed model FLOPs utilisation for the time estimate"),
    peak_tflops: float = typer.Option(989.0, help="dense bf16 peak of one GPU (H100/H200 SXM: 989)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of the table"),
) -> None:
    """Parameter count, per-GPU memory by ZeRO stage, activations at the largest bucket, fit and time."""
    from ultraflux_model.training.plan import format_plan, plan_run

    cfg = resolve_config(config, set_)
    plan = plan_run(
        cfg, gpus=gpus, gpu_memory_gb=gpu_memory_gb, nodes=nodes, reserve_gb=reserve_gb, mfu=mfu,
        peak_tflops=peak_tflops,
    )
    typer.echo(json.dumps(plan, indent=2) if as_json else format_plan(plan))
