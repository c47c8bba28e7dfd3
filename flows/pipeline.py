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
from ultraflux_core.console import progress_line
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.training.curriculum import stage_plans

from flows.data_flow import data_flow, ensure_base_checkpoint
from flows.release_flow import release_flow
from flows.train_flow import train_flow
from flows.vae_flow import vae_flow

STEPS = ("data", "train", "vae", "release")


def step_summary(step: str, result: Any) -> str:
    """What one step did, in one line (the data counts, each stage's losses, the VAE's change, the release)."""
    if step == "data":
        ingest, cache = result.get("ingest", {}), result.get("cache", {})
        passed = result.get("filter", {}).get("passed", {}).get("passed", "?")
        return (f"{ingest.get('ok', '?')} of {ingest.get('total', '?')} images kept ({ingest.get('quarantined', 0)} "
                f"quarantined), {passed} passed the filters, {cache.get('entries', '?')} cached as latents")
    if step == "train":
        if not result:
            return "every stage was already trained (resumed)"
        return "; ".join(f"{s['stage']}: {s['steps']} steps, loss {s['first_loss']:.3f} → {s['last_loss']:.3f}"
                         for s in result)
    if step == "vae":
        shown = [k for k in ("psnr", "lpips") if k in result["before"]] or list(result["before"])[:2]
        return ", ".join(f"{k} {result['before'][k]:.3f} → {result['after'][k]:.3f}" for k in shown) + " (held out)"
    registry = result.get("registry") or {}
    outcome = "now the champion" if registry.get("promoted") else f"champion kept ({registry.get('reason', '-')})"
    return f"{Path(result['checkpoint']).name}, registered as version {registry.get('version', '?')}: {outcome}"


def overall_scores(table: dict[str, dict[str, float]]) -> str:
    """The ``overall`` row of an evaluation table (``{aspect | "overall": {metric: value}}``) in one line."""
    row = table.get("overall", {})
    return ", ".join(f"{metric} {value:.4g}" for metric, value in sorted(row.items()) if metric != "n_images")


def champion_line(uri: str, model_name: str, alias: str, release: dict[str, Any]) -> str:
    """Which registered version holds the alias now, with its scores (this release's when it won)."""
    from ultraflux_core.tracking.uri import registered_version

    try:
        _, version = registered_version(uri, f"models:/{model_name}@{alias}")
    except UltraFluxError as err:
        return f"{alias}: none ({err})"
    registry = release.get("registry") or {}
    if str(registry.get("version")) == str(version):
        return f"{alias}: models:/{model_name}/{version} (this release) — {overall_scores(release['table'])}"
    return f"{alias}: models:/{model_name}/{version} — {registry.get('champion')} on the promotion metric"


def closing_summary(summary: dict[str, Any], champion: str) -> str:
    """The demo's last words: where the release, the champion, the report and the VAE table are, and what to run
    next (the web app and the MLflow UI on the store the pipeline used)."""
    release, vae = summary["release"], summary["vae"]
    uri = release["tracking_uri"]
    mlflow_ui = f".venv/bin/mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"
    lines = [
        "",
        "UltraFlux demo: done",
        f"  release   {release['checkpoint']}",
        f"  {champion}",
        f"  report    {release.get('report', '-')}",
        f"  eval run  {release['run_id']} in {uri}",
        "",
        "VAE decoder post-training (before → after):",
        *(f"  {line}".rstrip() for line in vae["table"].splitlines()),
        "",
        "next:",
        "  make ui      # UltraFlux Studio on the champion at http://127.0.0.1:7860",
        f"  {mlflow_ui}      # runs, the registry and the report",
    ]
    return "\n".join(lines)


@flow(name="ultraflux-pipeline", log_prints=False)
def pipeline(
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    init_tiny: bool = True,
    nproc: int = 1,
    local_store: str = "artifacts/mlflow.db",
) -> dict[str, Any]:
    """Run every step on the layered config (default ``params.yaml``); returns each step's summary and the closing
    summary (``closing``). Prints one progress line per step (plain stdout: Prefect's own logs may be silenced).

    Without ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` every step logs into the one SQLite file ``local_store``
    (the steps run alone default to a file in their own output folder).
    """
    config = list(config or ["params.yaml"])
    overrides = list(overrides or [])
    cfg = resolve_config(config, overrides)
    if cfg.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        overrides.append(f"tracking.uri=sqlite:///{Path(local_store).resolve()}")
    ensure_base_checkpoint(cfg.train.model, init_tiny)
    summary: dict[str, Any] = {}

    def done(step: str, result: Any) -> Any:
        summary[step] = result
        print(progress_line(len(summary), len(STEPS), step, step_summary(step, result)), flush=True)
        return result

    done("data", data_flow(config=config, overrides=overrides))
    done("train", train_flow(config=config, overrides=overrides, resume=True, nproc=nproc))
    vae = done("vae", vae_flow(config=config, overrides=overrides))
    # The stage export is a full checkpoint; release its raw transformer (also when resume skipped the stage).
    final_stage = stage_plans(cfg.train)[-1].export / "transformer"
    release = done("release", release_flow(transformer=str(final_stage), vae=vae["export"], config=config,
                                           overrides=overrides))
    promotion = resolve_config(config, overrides).eval.promotion
    summary["closing"] = closing_summary(
        summary, champion_line(release["tracking_uri"], promotion.model_name, promotion.alias, release))
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
        result = pipeline(config=config, overrides=set_, init_tiny=init_tiny, nproc=nproc, local_store=local_store)
        typer.echo(result["closing"])

    typer.run(main)
