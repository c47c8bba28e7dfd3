"""``ultraflux data ...``: one command per pipeline stage (what ``dvc.yaml`` runs) plus tools.

Every stage command reads the config tree (``-c params.yaml [-c preset] --set data.x=y``) and prints its
counts. The per-image stages run on the ``compute`` section's engine (``--set compute.engine=ray --set
compute.workers=2``). Library imports happen inside the commands so ``ultraflux --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ultraflux_data.config import ComputeConfig, DataConfig
from ultraflux.config import resolve_config

app = typer.Typer(help="MultiAspect-4K data: ingest, score, filter, bucket, shard, cache.", no_args_is_help=True)

ConfigOpt = typer.Option([], "--config", "-c", help="YAML files layered in order (e.g. params.yaml)")
SetOpt = typer.Option([], "--set", help="section.key=value overrides, e.g. data.source=DIR")


def _configs(config: list[Path], set_: list[str], **fields: object) -> tuple[DataConfig, ComputeConfig]:
    """The ``data`` and ``compute`` sections; ``fields`` are ``data.``-relative overrides (None: not given)."""
    overrides = list(set_) + [f"data.{k}={v}" for k, v in fields.items() if v is not None]
    resolved = resolve_config(config, overrides)
    return resolved.data, resolved.compute


def _data_config(config: list[Path], set_: list[str], **fields: object) -> DataConfig:
    return _configs(config, set_, **fields)[0]


def _echo_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


@app.command("synth")
def synth(out: Path = typer.Option(..., help="folder to write"),
          n: int = typer.Option(24, "--n", "-n", help="good images (odd/bad files are added)"),
          seed: int = 0, base_side: int = typer.Option(320, help="images hold about base_side² pixels")) -> None:
    """Write the deterministic synthetic dataset (images + metadata.jsonl)."""
    from ultraflux_data.synthetic import write_synthetic_dataset

    typer.echo(f"wrote {write_synthetic_dataset(out, n=n, seed=seed, base_side=base_side)}")


@app.command("validate")
def validate(metadata: Path) -> None:
    """Validation report of a metadata file (jsonl, parquet or csv): counts, missing fields, duplicates."""
    from ultraflux_data.metadata import read_metadata

    _, report = read_metadata(metadata)
    typer.echo(report.summary())


@app.command("download")
def download(metadata: Path, out: Path = typer.Option(...), config: list[Path] = ConfigOpt,
             set_: list[str] = SetOpt) -> None:
    """Download the http(s) ``image_url``s of a metadata file (or a .txt list of URLs) into OUT, resumably."""
    from ultraflux_data.download import download_urls, listed_urls, summarise

    cfg, compute = _configs(config, set_)
    results = download_urls(listed_urls(metadata), out, cfg.download, compute=compute)
    _echo_json(summarise(results))
    for result in results.values():
        if result.status == "failed":
            typer.echo(f"failed  {result.url}: {result.reason}", err=True)


@app.command("ingest")
def ingest_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt,
               source: str | None = typer.Option(None, help="'synthetic', a folder, or a metadata file"),
               out: Path | None = typer.Option(None, help="write here instead of <data.root>/ingest")) -> None:
    """Ingest with quarantine: writes OUT/manifest.parquet (status ok|quarantined, reason) and the images."""
    from ultraflux_data.ingest import ingest
    from ultraflux_data.stages import prepare_source, run_ingest

    cfg, compute = _configs(config, set_, source=source)
    summary = ingest(prepare_source(cfg), out, cfg, compute=compute) if out is not None else run_ingest(cfg,
                                                                                                       compute=compute)
    typer.echo(summary.text())


@app.command("score")
def score_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Score every ok image (resolution, flatness, entropy, Q-Align, aesthetics) into scores.parquet; resumable."""
    from ultraflux_data.stages import run_score

    cfg, compute = _configs(config, set_)
    _echo_json(run_score(cfg, compute=compute).model_dump())


@app.command("filter")
def filter_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Apply the filters and write the train / stage2 / vae subsets."""
    from ultraflux_data.stages import run_filter

    _echo_json(run_filter(_data_config(config, set_)).model_dump())


@app.command("bucket")
def bucket_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Assign training images to aspect-ratio buckets; write counts and the histogram PNG."""
    from ultraflux_data.stages import run_bucket

    _echo_json(run_bucket(_data_config(config, set_)))


@app.command("shard")
def shard_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Write tar shards of bucket-sized images + JSON sidecars."""
    from ultraflux_data.stages import run_shard

    cfg, compute = _configs(config, set_)
    _echo_json(run_shard(cfg, compute=compute).model_dump())


@app.command("cache")
def cache_cmd(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Encode shards into VAE-latent + text-embedding caches (reused when image and model hashes match)."""
    from ultraflux_data.stages import run_cache

    cfg, compute = _configs(config, set_)
    _echo_json(run_cache(cfg, compute=compute).model_dump())
