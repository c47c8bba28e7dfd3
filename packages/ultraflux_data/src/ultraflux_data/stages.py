"""The pipeline stages over one ``DataConfig``: where each stage reads and writes, and the call it makes.

``ultraflux data <stage>`` (and so ``dvc.yaml``) and ``flows/data_flow.py`` both call these functions, so the
folder layout under ``data.root`` is defined once:

``ingest/`` (manifest.parquet, images/, and ``synthetic/`` when the source is synthetic) → ``scores.parquet``
→ ``subsets/`` (selection, train, stage2, vae .parquet, _commit.json) → ``buckets/`` (assignments.parquet,
histogram.png) → ``shards/`` (shard-*.tar, index.parquet) → ``cache/`` (entries/, index.parquet,
quarantine.parquet). Each stage also writes its counts to ``metrics/<stage>.json`` (DVC metrics).

Commits: every file is written whole and renamed into place; ``subsets/`` is committed as one folder with a
commit marker that ``bucket`` verifies before it reads. ``filter`` and ``bucket`` hold a stage lock
(``<root>/.locks/<stage>.lock``): a second concurrent run of the same stage refuses, naming the holder.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from pydantic import BaseModel
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import atomic_bytes, read_committed, uncommitted_siblings
from ultraflux_core.locks import exclusive

from ultraflux_data.config import ComputeConfig, DataConfig
from ultraflux_data.metadata import METADATA_SUFFIXES
from ultraflux_data.partitions import atomic_parquet

if TYPE_CHECKING:  # each stage imports only what it runs: a DVC stage is a fresh process
    from ultraflux_data.cache import CacheSummary
    from ultraflux_data.filters import FilterSummary
    from ultraflux_data.ingest import IngestSummary
    from ultraflux_data.scoring import ScoreSummary
    from ultraflux_data.shards import ShardSummary


@dataclass(frozen=True)
class DataPaths:
    """Every stage folder/file below ``root``."""

    root: Path

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    @property
    def synthetic(self) -> Path:
        """Inside the ingest output, so one DVC stage owns both and a fresh clone regenerates them."""
        return self.ingest / "synthetic"

    @property
    def scores(self) -> Path:
        return self.root / "scores.parquet"

    @property
    def subsets(self) -> Path:
        return self.root / "subsets"

    @property
    def buckets(self) -> Path:
        return self.root / "buckets"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def write_metrics(self, stage: str, payload: BaseModel | dict) -> None:
        data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        atomic_bytes(self.metrics / f"{stage}.json", (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Hold ``name``'s stage lock (refusing when another run holds it). Outside every DVC output folder, so
        the lock files never enter a stage's hash."""
        with exclusive(self.root / ".locks" / f"{name}.lock", f"the data {name} stage of {self.root}"):
            yield


def prepare_source(cfg: DataConfig) -> Path:
    """The folder or metadata file ``cfg.source`` names; ``synthetic`` is written (deterministically) first."""
    from ultraflux_data.synthetic import write_synthetic_dataset

    if cfg.source == "synthetic":
        syn = cfg.synthetic
        return write_synthetic_dataset(DataPaths(cfg.root).synthetic, n=syn.n, seed=syn.seed,
                                       base_side=syn.base_side)
    source = Path(cfg.source)
    if not source.exists():
        raise UltraFluxError(
            f"data source {source} does not exist: set data.source to 'synthetic', a folder of images or a "
            f"metadata file ({', '.join(METADATA_SUFFIXES)})"
        )
    return source


def run_download(cfg: DataConfig, progress: bool = True, compute: ComputeConfig | None = None) -> dict[str, int]:
    """Fetch the http(s) images a metadata source lists into ``<root>/ingest/downloads``, where ingest looks for
    them (resumable: a re-run fetches only what is missing); counts per status."""
    from ultraflux_data.download import download_urls, listed_urls, summarise

    urls = listed_urls(Path(cfg.source))
    return summarise(download_urls(urls, DataPaths(cfg.root).ingest / "downloads", cfg.download, progress=progress,
                                   compute=compute))


def run_ingest(cfg: DataConfig, progress: bool = True, compute: ComputeConfig | None = None) -> IngestSummary:
    from ultraflux_data.ingest import ingest

    paths = DataPaths(cfg.root)
    summary = ingest(prepare_source(cfg), paths.ingest, cfg, progress=progress, compute=compute)
    paths.write_metrics("ingest", summary)
    return summary


def run_score(cfg: DataConfig, progress: bool = True, compute: ComputeConfig | None = None) -> ScoreSummary:
    from ultraflux_data.scoring import score_manifest

    paths = DataPaths(cfg.root)
    summary = score_manifest(paths.ingest, paths.scores, cfg.scoring, progress=progress, compute=compute)
    paths.write_metrics("score", summary)
    return summary


def run_filter(cfg: DataConfig) -> FilterSummary:
    from ultraflux_data.filters import select_subsets
    from ultraflux_data.ingest import read_manifest

    paths = DataPaths(cfg.root)
    with paths.stage("filter"):
        for stale in uncommitted_siblings(paths.subsets):  # left by a killed run; no other writer is live
            shutil.rmtree(stale, ignore_errors=True)
        summary = select_subsets(paths.scores, read_manifest(paths.ingest), paths.subsets, cfg.filter)
        paths.write_metrics("filter", summary)
    return summary


def run_bucket(cfg: DataConfig) -> dict[str, int]:
    """Assign the training subset to buckets; write assignments, counts (a DVC metric) and the histogram."""
    from ultraflux_data.bucketing import add_bucket_columns, bucket_counts, bucket_histogram_png

    paths = DataPaths(cfg.root)
    train_path = paths.subsets / "train.parquet"
    if not train_path.is_file():
        raise UltraFluxError(f"{train_path} does not exist: run `ultraflux data filter` first")
    with paths.stage("bucket"):
        # Only what filter committed: a file from an interrupted run or edited since is refused, not bucketed.
        data = read_committed(paths.subsets, ["train.parquet"], "ultraflux data filter")["train.parquet"]
        train = add_bucket_columns(pd.read_parquet(io.BytesIO(data)), cfg.buckets.family)
        atomic_parquet(train, paths.buckets / "assignments.parquet")
        counts = bucket_counts(train, cfg.buckets.family)
        paths.write_metrics("buckets", counts)
        bucket_histogram_png(counts, paths.buckets / "histogram.png",
                             title=f"training images per bucket ({cfg.buckets.family} family)")
    return counts


def run_shard(cfg: DataConfig, progress: bool = True, compute: ComputeConfig | None = None) -> ShardSummary:
    from ultraflux_data.shards import write_shards

    paths = DataPaths(cfg.root)
    assignments = paths.buckets / "assignments.parquet"
    if not assignments.is_file():
        raise UltraFluxError(f"{assignments} does not exist: run `ultraflux data bucket` first")
    summary = write_shards(pd.read_parquet(assignments), paths.ingest, paths.shards, cfg.shards, progress=progress,
                           compute=compute)
    paths.write_metrics("shard", summary)
    return summary


def run_cache(cfg: DataConfig, progress: bool = True, compute: ComputeConfig | None = None) -> CacheSummary:
    from ultraflux_data.cache import build_caches

    paths = DataPaths(cfg.root)
    c = cfg.cache
    summary = build_caches(paths.shards, c.model, paths.cache, max_sequence_length=c.max_sequence_length,
                           batch_size=c.batch_size, dtype=c.dtype, device=c.device, family=cfg.buckets.family,
                           progress=progress, compute=compute)
    paths.write_metrics("cache", summary)
    return summary
