"""The end-to-end job: data → SACL training → VAE post-training → release (evaluate, register, promote).

Every step is a subflow that also runs on its own (and as a DVC stage); this flow only chains their outputs.
On the embedded defaults (``params.yaml``: tiny model, synthetic data, SQLite MLflow, ephemeral Prefect) it runs
on a CPU in minutes; presets point the same flow at real data and checkpoints.

    python -m flows.pipeline                                  # what `make demo` runs
    python -m flows.pipeline --config params.yaml --config configs/4k.yaml --no-init-tiny
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from ultraflux.config import resolve_config
from ultraflux_model.training.curriculum import stage_plans

from flows.data_flow import data_flow, ensure_base_checkpoint
from flows.release_flow import release_flow
from flows.train_flow import train_flow
from flows.vae_flow import vae_flow


@flow(name="ultraflux-pipeline", log_prints=True)
def pipeline(
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    init_tiny: bool = True,
    nproc: int = 1,
    local_store: str = "artifacts/mlflow.db",
) -> dict[str, Any]:
    """Run every step on the layered config (default ``params.yaml``); returns each step's summary.

    Without ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` every step logs into the one SQLite file ``local_store``
    (the steps run alone default to a file in their own output folder).
    """
    config = list(config or ["params.yaml"])
    overrides = list(overrides or [])
    cfg = resolve_config(config, overrides)
    if cfg.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        overrides.append(f"tracking.uri=sqlite:///{Path(local_store).resolve()}")
    ensure_base_checkpoint(cfg.train.model, init_tiny)
    data = data_flow(config=config, overrides=overrides)
    stages = train_flow(config=config, overrides=overrides, resume=True, nproc=nproc)
    vae = vae_flow(config=config, overrides=overrides)
    # The stage export is a full checkpoint; release its raw transformer (also when resume skipped the stage).
    final_stage = stage_plans(cfg.train)[-1].export / "transformer"
    release = release_flow(transformer=str(final_stage), vae=vae["export"], config=config, overrides=overrides)
    summary = {"data": data, "train": stages, "vae": vae, "release": release}
    print(f"pipeline done: release {release['checkpoint']}, eval run {release['run_id']}")
    return summary


if __name__ == "__main__":
    import typer

    def main(
        config: list[str] = typer.Option([], help="YAML files layered in order (default params.yaml)"),
        set_: list[str] = typer.Option([], "--set", help="section.key=value overrides"),
        init_tiny: bool = typer.Option(True, help="write the tiny checkpoint when the base one is missing"),
        nproc: int = typer.Option(1, help="training ranks on this node (torchrun)"),
        local_store: str = typer.Option("artifacts/mlflow.db", help="SQLite MLflow file when no server is set"),
    ) -> None:
        pipeline(config=config, overrides=set_, init_tiny=init_tiny, nproc=nproc, local_store=local_store)

    typer.run(main)
