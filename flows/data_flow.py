"""Data flow: (download) → ingest → score → filter → bucket → shard → cache, with a summary artifact.

Thin: each task is one call of ``ultraflux_data.stages`` (the functions ``dvc.yaml``'s stages run
through the CLI), so the flow and ``dvc repro`` produce the same folders under ``data.root``. Downloads get
task-level retries on top of the per-URL retries; they land where ingest looks for them, so ingest resumes
instead of fetching twice. The ``compute`` section goes to every per-image stage: with ``compute.engine=ray``
the stage fans its partitions out on Ray (see ``ultraflux_data.compute``); Prefect only orders the stages.

    python -m flows.data_flow --config params.yaml --set data.source=metadata.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from ultraflux.config import resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_data import stages
from ultraflux_data.config import ComputeConfig, DataConfig

STAGES = ("ingest", "score", "filter", "bucket", "shard", "cache")


@task(name="base-checkpoint")
def ensure_base_checkpoint(model: str, init_tiny: bool) -> str:
    """The base checkpoint must exist; with ``init_tiny`` a missing local one is written as the tiny checkpoint."""
    from ultraflux_model.checkpoint.tiny import ensure_checkpoint

    return str(ensure_checkpoint(model, init_tiny))


@task(name="data-download", retries=2, retry_delay_seconds=10)
def download(cfg: DataConfig, compute: ComputeConfig) -> dict[str, int]:
    """Fetch the http(s) images of a metadata source into ``<root>/ingest/downloads`` (resumable)."""
    return stages.run_download(cfg, progress=False, compute=compute)


@task(name="data-ingest")
def ingest(cfg: DataConfig, compute: ComputeConfig) -> dict[str, Any]:
    return stages.run_ingest(cfg, progress=False, compute=compute).model_dump()


@task(name="data-score")
def score(cfg: DataConfig, compute: ComputeConfig) -> dict[str, Any]:
    return stages.run_score(cfg, progress=False, compute=compute).model_dump()


@task(name="data-filter")
def select(cfg: DataConfig) -> dict[str, Any]:
    return stages.run_filter(cfg).model_dump()


@task(name="data-bucket")
def bucket(cfg: DataConfig) -> dict[str, int]:
    return stages.run_bucket(cfg)


@task(name="data-shard")
def shard(cfg: DataConfig, compute: ComputeConfig) -> dict[str, Any]:
    return stages.run_shard(cfg, progress=False, compute=compute).model_dump()


@task(name="data-cache")
def cache(cfg: DataConfig, compute: ComputeConfig) -> dict[str, Any]:
    return stages.run_cache(cfg, progress=False, compute=compute).model_dump()


def summary_markdown(results: dict[str, Any]) -> str:
    """One table row per stage with its counts (the flow's artifact)."""
    lines = ["| stage | counts |", "|---|---|"]
    for name, counts in results.items():
        counts = counts if isinstance(counts, dict) else {"value": counts}
        shown = {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in counts.items() if isinstance(v, dict)}
        text = ", ".join(f"{k}: {v}" for k, v in shown.items())
        text += "".join(f"; {k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in nested.items())
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines) + "\n"


@flow(name="ultraflux-data", log_prints=True)
def data_flow(config: list[str] | None = None, overrides: list[str] | None = None,
              until: str = "cache", roots: SharedRoots | None = None, init_tiny: bool = False) -> dict[str, Any]:
    """Run the data pipeline on the ``data`` section of the layered config, up to and including ``until``.

    ``roots`` moves the outputs onto shared folders (deployments); ``init_tiny`` writes the tiny checkpoint where
    the cache stage's model is expected when it is missing (a fresh deployment on the tiny defaults).
    """
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    resolved = resolve_config(config, with_roots(config, overrides, roots))
    cfg, compute = resolved.data, resolved.compute
    if init_tiny and STAGES.index(until) >= STAGES.index("cache"):
        ensure_base_checkpoint(cfg.cache.model, init_tiny)
    per_image = {"ingest": ingest, "score": score, "shard": shard, "cache": cache}
    whole_table = {"filter": select, "bucket": bucket}
    results: dict[str, Any] = {}
    if cfg.source != "synthetic" and Path(cfg.source).is_file():
        results["download"] = download(cfg, compute)
    for name in STAGES[: STAGES.index(until) + 1]:
        results[name] = per_image[name](cfg, compute) if name in per_image else whole_table[name](cfg)
        get_run_logger().info("%s: %s", name, results[name])
    create_markdown_artifact(markdown=f"# Data pipeline ({cfg.root})\n\n" + summary_markdown(results),
                             key="data-summary", description="counts per data stage")
    return results


if __name__ == "__main__":
    import typer

    def main(config: list[str] = typer.Option([]), set_: list[str] = typer.Option([], "--set"),
             until: str = typer.Option("cache")) -> None:
        print(data_flow(config=config, overrides=set_, until=until))

    typer.run(main)
