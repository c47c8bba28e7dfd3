"""``ultraflux data ...``: one command per pipeline stage (what ``dvc.yaml`` runs) plus tools.

Every stage command reads the config tree (``-c params.yaml [-c preset] --set data.x=y``) and prints its
counts. The per-image stages run on the ``compute`` section's engine (``--set compute.engine=ray --set
compute.workers=2``). Library imports happen inside the commands so ``ultraflux --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from ultraflux_core.options import Options, config_options
from ultraflux_data.config import ComputeConfig, DataConfig, SyntheticDataConfig

from ultraflux.config import resolve_config

app = typer.Typer(help="MultiAspect-4K data: ingest, score, filter, bucket, shard, cache.", no_args_is_help=True)

# Every stage command takes the data root and source; the per-image stages also where their work runs.
DATA_OPTIONS = Options("data", DataConfig, include=("root", "source"))
STAGE_OPTIONS = (DATA_OPTIONS, Options("compute", ComputeConfig))


def _echo_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


@app.command("synth")
def synth(
    out: Path = typer.Option(..., help="folder to write"),
    n: int = typer.Option(SyntheticDataConfig().n, "--n", "-n", help=SyntheticDataConfig.model_fields["n"].description),
    seed: int = typer.Option(SyntheticDataConfig().seed, help="random seed of the set"),
    base_side: int = typer.Option(SyntheticDataConfig().base_side,
                                  help=SyntheticDataConfig.model_fields["base_side"].description),
) -> None:
    """Write the deterministic synthetic dataset (images + metadata.jsonl) to OUT (data.synthetic's fields)."""
    from ultraflux_data.synthetic import write_synthetic_dataset

    typer.echo(f"wrote {write_synthetic_dataset(out, n=n, seed=seed, base_side=base_side)}")


@app.command("validate")
def validate(metadata: Path) -> None:
    """Validation report of a metadata file (jsonl, parquet or csv): counts, missing fields, duplicates."""
    from ultraflux_data.metadata import read_metadata

    _, report = read_metadata(metadata)
    typer.echo(report.summary())


@app.command("download")
@config_options(Options("compute", ComputeConfig))
def download(metadata: Path, out: Path = typer.Option(...), *, config: list[Path], overrides: list[str]) -> None:
    """Download the http(s) image_url values of a metadata file (or a .txt list of URLs) into OUT, resumably."""
    from ultraflux_data.download import download_urls, listed_urls, summarise

    cfg = resolve_config(config, overrides)
    results = download_urls(listed_urls(metadata), out, cfg.data.download, compute=cfg.compute)
    _echo_json(summarise(results))
    for result in results.values():
        if result.status == "failed":
            typer.echo(f"failed  {result.url}: {result.reason}", err=True)


@app.command("ingest")
@config_options(*STAGE_OPTIONS)
def ingest_cmd(
    out: Path | None = typer.Option(None, help="write here instead of <data.root>/ingest"),
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Ingest with quarantine: writes OUT/manifest.parquet (status ok|quarantined, reason) and the images."""
    from ultraflux_data.ingest import ingest
    from ultraflux_data.stages import prepare_source, run_ingest

    cfg = resolve_config(config, overrides)
    summary = (ingest(prepare_source(cfg.data), out, cfg.data, compute=cfg.compute) if out is not None
               else run_ingest(cfg.data, compute=cfg.compute))
    typer.echo(summary.text())


@app.command("score")
@config_options(*STAGE_OPTIONS)
def score_cmd(*, config: list[Path], overrides: list[str]) -> None:
    """Score every ok image (resolution, flatness, entropy, Q-Align, aesthetics) into scores.parquet; resumable."""
    from ultraflux_data.stages import run_score

    cfg = resolve_config(config, overrides)
    _echo_json(run_score(cfg.data, compute=cfg.compute).model_dump())


@app.command("filter")
@config_options(DATA_OPTIONS)
def filter_cmd(*, config: list[Path], overrides: list[str]) -> None:
    """Apply the filters and write the train / stage2 / vae subsets."""
    from ultraflux_data.stages import run_filter

    _echo_json(run_filter(resolve_config(config, overrides).data).model_dump())


@app.command("bucket")
@config_options(DATA_OPTIONS)
def bucket_cmd(*, config: list[Path], overrides: list[str]) -> None:
    """Assign training images to aspect-ratio buckets; write counts and the histogram PNG."""
    from ultraflux_data.stages import run_bucket

    _echo_json(run_bucket(resolve_config(config, overrides).data))


@app.command("shard")
@config_options(*STAGE_OPTIONS)
def shard_cmd(*, config: list[Path], overrides: list[str]) -> None:
    """Write tar shards of bucket-sized images + JSON sidecars."""
    from ultraflux_data.stages import run_shard

    cfg = resolve_config(config, overrides)
    _echo_json(run_shard(cfg.data, compute=cfg.compute).model_dump())


@app.command("cache")
@config_options(*STAGE_OPTIONS)
def cache_cmd(*, config: list[Path], overrides: list[str]) -> None:
    """Encode shards into VAE-latent + text-embedding caches (reused when image and model hashes match)."""
    from ultraflux_data.stages import run_cache

    cfg = resolve_config(config, overrides)
    _echo_json(run_cache(cfg.data, compute=cfg.compute).model_dump())
