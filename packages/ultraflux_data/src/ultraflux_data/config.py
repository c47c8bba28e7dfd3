"""The config sections the data package owns: ``data`` (ingest → score → filter → bucket → shard → cache) and
``compute`` (where the per-image stages run). Frozen, unknown keys rejected (``ultraflux_core.config.Section``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from ultraflux_core.config import Section
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import Dtype


class SyntheticDataConfig(Section):
    """Procedural demo/test dataset written when ``data.source`` is ``synthetic``."""

    n: int = Field(24, ge=1, description="good images (a fixed set of bad/odd files is added on top)")
    seed: int = 0
    base_side: int = Field(320, ge=64, description="images hold about base_side² pixels at every aspect ratio")


class DownloadConfig(Section):
    """Safe HTTP(S) fetching of ``image_url``s."""

    concurrency: int = Field(8, ge=1)
    retries: int = Field(3, ge=0, description="extra attempts after connection errors, timeouts, 429 and 5xx")
    backoff_s: float = Field(0.5, ge=0.0, description="first retry delay; doubles per attempt")
    connect_timeout_s: float = Field(10.0, gt=0.0)
    read_timeout_s: float = Field(30.0, gt=0.0)
    max_bytes: int = Field(64 * 2**20, ge=1, description="larger bodies are aborted")
    max_redirects: int = Field(5, ge=0)
    deadline_s: float = Field(
        300.0, gt=0.0, description="the most one URL may take, every attempt, redirect, read and backoff included"
    )
    min_rate_bytes_s: float = Field(
        1024.0, ge=0.0, description="a body arriving slower than this on average is aborted (0: no minimum)"
    )
    min_rate_grace_s: float = Field(10.0, ge=0.0, description="the minimum rate applies after this long")
    allow_private: bool = Field(False, description="allow loopback/private/link-local targets everywhere")
    private_hosts: tuple[str, ...] = Field(
        (), description="host:port pairs allowed to be non-public (a mirror), e.g. mirror.lan:8080 or [fd00::5]:443; "
        "other ports of the same host stay blocked"
    )
    content_types: tuple[str, ...] = (
        "image/jpeg", "image/png", "image/webp", "image/tiff", "image/bmp", "image/gif", "application/octet-stream",
    )


    @field_validator("private_hosts")
    @classmethod
    def _host_and_port(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            host_port(entry)  # raises a clear error for an entry without a port
        return tuple(entry.lower() for entry in entries)


def host_port(entry: str) -> tuple[str, int]:
    """``("host", port)`` of a ``host:port`` entry (an IPv6 host in brackets: ``[fd00::5]:443``)."""
    host, sep, port = entry.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and "[" not in entry):
        raise UltraFluxError(
            f"data.download.private_hosts entry {entry!r} is not host:port (e.g. mirror.lan:8080, [fd00::5]:443): "
            "an allowed host is allowed on one port only"
        )
    return host.lower(), int(port)


class IngestConfig(Section):
    """Decoding limits of ``ultraflux data ingest`` (quarantine rules)."""

    max_pixels: int = Field(
        80_000_000, ge=1, le=89_478_485, description="decompression-bomb limit (at most PIL's own 89.5 MP)"
    )
    min_side: int = Field(32, ge=1, description="shorter side below this is quarantined as tiny")
    max_bytes: int = Field(
        512 * 2**20, ge=1, description="larger input files are quarantined from their size, before any byte is read"
    )
    trailing_data: Literal["quarantine", "strip"] = Field(
        "quarantine", description="bytes after a kept JPEG/PNG/WebP's end marker: quarantine the file, or store the "
        "image without them (phones append gain maps and motion-photo videos after the JPEG)"
    )


class ScoringConfig(Section):
    """Per-image scores: weight-free (resolution, flatness, entropy) and learned (Q-Align, aesthetics)."""

    flat_patch: int = Field(64, ge=8, description="flatness patch side (official 240)")
    flat_threshold: float = Field(800.0, gt=0.0, description="Sobel-magnitude variance below this is flat")
    qalign: Literal["tiny", "local", "metadata", "none"] = Field(
        "tiny", description="tiny: Q-Align's mPLUG-Owl2 at toy width, random; local: eval weights_dir (qalign); "
        "metadata: only the metadata's qalign_score"
    )
    aesthetics: Literal["tiny", "local", "metadata", "none"] = Field(
        "tiny", description="tiny: aesthetics_scorer's architecture at toy width, random; local: eval weights_dir"
    )
    aesthetics_scorer: Literal["artimuse", "laion"] = Field(
        "artimuse", description="artimuse: the paper's ArtiMuse (0-100); laion: LAION head on CLIP (1-10)"
    )
    weights_dir: Path = Field(Path("storage/eval-weights"), description="eval weights folder (manifest.yaml)")
    device: str = "cpu"
    batch_size: int = Field(8, ge=1)
    reuse_metadata_scores: bool = Field(True, description="take qalign/aesthetics from the metadata when present")


class FilterConfig(Section):
    """Dataset filters and subsets (official values in configs/4k.yaml)."""

    min_long_side: int = Field(256, ge=1, description="official 3840")
    min_short_side: int = Field(144, ge=1, description="official 2160")
    max_flat: float = Field(0.5, ge=0.0, le=1.0, description="drop if flat share is above this")
    min_entropy: float = Field(7.0, ge=0.0, le=8.0, description="keep if grayscale Shannon entropy ≥ this")
    min_qalign: float | None = Field(
        1.0, description="keep if Q-Align > this (official 4.0; Q-Align lies in [1, 5]); null skips the rule"
    )
    aesthetics_top: float = Field(
        0.75, gt=0.0, le=1.0,
        description="training set: top share by aesthetics (paper 0.30; 1.0 keeps every image that passes, for a "
        "release that is already aesthetics-filtered)",
    )
    stage2_top: float = Field(
        0.4, gt=0.0, le=1.0, description="SACL stage 2: top share by aesthetics of stage2_pool (paper 0.05)"
    )
    stage2_pool: Literal["aesthetic_subset", "full_pool"] = Field(
        "aesthetic_subset",
        description="what stage2_top is a share of: the training set (top aesthetics_top; our reading) or every "
        "image passing the quality filters (docs/training.md, paper facts and our readings)",
    )
    vae_least_flat: float = Field(0.5, gt=0.0, le=1.0, description="VAE post-training: least-flat share (0.5)")

    @model_validator(mode="after")
    def _stage2_inside_training_set(self) -> FilterConfig:
        # the stage-2 images are cached with the training set: a share of the whole pool must stay inside it
        if self.stage2_pool == "full_pool" and self.stage2_top > self.aesthetics_top:
            raise ValueError(
                f"stage2_pool full_pool needs stage2_top ({self.stage2_top}) <= aesthetics_top "
                f"({self.aesthetics_top}): stage 2 trains on training-set images only"
            )
        return self


class BucketConfig(Section):
    """Aspect-ratio bucket family used for shards and caches."""

    family: Literal["4k", "2k", "1k", "512", "256"] = "256"


class ShardConfig(Section):
    """Training shards: tar files of bucket-sized PNG/JPEG + JSON."""

    samples_per_shard: int = Field(64, ge=1)
    image_format: Literal["png", "jpeg"] = "png"


class CacheConfig(Section):
    """Latent and text-embedding caches (F16 VAE latents, T5 sequence, CLIP pooled)."""

    model: Path = Field(Path("artifacts/tiny-ultraflux"), description="checkpoint with vae/ and text encoders")
    max_sequence_length: int = Field(32, ge=1, le=512, description="T5 tokens (official 512)")
    batch_size: int = Field(4, ge=1)
    dtype: Dtype = "fp32"
    device: str = "cpu"


class DataConfig(Section):
    """MultiAspect-4K pipeline: ingest → score → filter → bucket → shard → cache (see docs/data.md)."""

    source: str = Field("synthetic", description="'synthetic', a folder of images, or a jsonl/parquet/csv file")
    root: Path = Field(Path("artifacts/data"), description="every stage writes below this folder")
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    download: DownloadConfig = DownloadConfig()
    ingest: IngestConfig = IngestConfig()
    scoring: ScoringConfig = ScoringConfig()
    filter: FilterConfig = FilterConfig()
    buckets: BucketConfig = BucketConfig()
    shards: ShardConfig = ShardConfig()
    cache: CacheConfig = CacheConfig()




class ComputeConfig(Section):
    """Where the per-image data stages and the benchmark grid run (``ultraflux_data.compute``): here or on Ray.

    ``local`` and ``ray`` run the same partition functions, so outputs are identical whichever engine ran them.
    """

    engine: Literal["local", "ray"] = Field("local", description="local: in this process; ray: Ray tasks/actors")
    address: str | None = Field(
        None,
        description="ray only. None: start a local Ray instance; 'auto' (on a cluster node), 'host:port' (the "
        "head's GCS) or 'ray://host:port' (Ray Client): join a cluster. A cluster with token auth (Ray's default "
        "for `ray start`) needs its token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token) for "
        "an explicit address",
    )
    workers: int = Field(1, ge=1, description="parallel Ray tasks / actors per stage (local runs one at a time)")
    gpus_per_worker: float = Field(
        0.0, ge=0.0, description="GPUs per actor of the model stages (score, cache) and of the evaluation's "
        "benchmark grid (each actor loads the pipeline once)"
    )
    task_retries: int = Field(
        3, ge=0, description="ray only: times a task partition (download, ingest, shard) is re-run after its Ray "
        "worker process or node died (safe: partitions are idempotent); then the stage fails with a message saying "
        "so. The actor stages (score, cache) restart dead actors through Ray Data"
    )
    partition_size: int = Field(
        64, ge=1, description="target images per partition (partitions are key-hash ranges, a power of two of them)"
    )


