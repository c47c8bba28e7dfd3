"""Training shards: tar files of bucket-sized images plus a JSON sidecar per sample (webdataset layout).

Each sample ``<key>`` is two members, ``<key>.png`` (or ``.jpg``) already resized and centre-cropped to its
bucket, and ``<key>.json`` with caption, bucket, aesthetics score and subset flags. An image that already has
its bucket's size and is a PNG or JPEG keeps its original encoded bytes (no decode/re-encode, no quality loss).
``index.parquet`` lists every sample with its shard, so readers can select subsets without opening the tars.

One shard is one partition: a key-hash range (``data.shards.samples_per_shard`` on average), named
``shard-p<index>of<count>-<inputs hash>.tar``, written atomically by ``ultraflux_data.compute`` workers (in
this process or as Ray tasks) under a per-shard lock, with its index rows under ``.parts/``. A re-run skips
finished shards; the index is committed by rename under the stage lock, which also removes shards the new
index no longer lists. Tars are deterministic (sorted keys, zero mtimes and ids): the same inputs give
byte-identical shards, so DVC sees no change on a re-run.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from pydantic import BaseModel
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import atomic_write

from ultraflux_data.bucketing import resize_center_crop
from ultraflux_data.compute import map_partitions
from ultraflux_data.config import ComputeConfig, ShardConfig
from ultraflux_data.partitions import (
    atomic_parquet,
    content_hash,
    part_name,
    partition_lock,
    split_by_key,
    stage_lock,
)

INDEX = "index.parquet"
PARTS = ".parts"
_FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95})}
_KEEP_AS_IS = {"PNG": "png", "JPEG": "jpg"}  # formats whose original bytes a shard stores unchanged
_INDEX_COLUMNS = ["key", "shard", "image", "bucket_width", "bucket_height", "caption", "aesthetics", "in_stage2",
                  "in_vae", "stored"]


@dataclass(frozen=True)
class ShardSample:
    """One sample read back from a shard: the bucket-sized RGB image and its sidecar."""

    key: str
    image: Image.Image
    meta: dict[str, Any]


class ShardSummary(BaseModel):
    samples: int
    shards: int
    written: int = 0
    kept_original: int = 0


def _sidecar(row: pd.Series) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        return None if value is None or (isinstance(value, float) and value != value) else value

    return {
        "key": row["key"],
        "caption": clean(row.get("caption_en")) or "",
        "caption_zh": clean(row.get("caption_zh")),
        "bucket": [int(row["bucket_width"]), int(row["bucket_height"])],
        "aesthetics": float(clean(row.get("aesthetics_score")) or 0.0),
        "in_stage2": bool(row.get("in_stage2", False)),
        "in_vae": bool(row.get("in_vae", False)),
        "source": clean(row.get("source")),
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _encoded(path: Path, bucket: tuple[int, int], cfg: ShardConfig) -> tuple[bytes, str, str]:
    """``(bytes, extension, how)``: the original bytes when already bucket-sized PNG/JPEG, else resized+encoded."""
    with Image.open(path) as image:
        if image.size == bucket and image.format in _KEEP_AS_IS and image.mode == "RGB":
            return path.read_bytes(), _KEEP_AS_IS[image.format], "original"
        sized = resize_center_crop(image, bucket)
    fmt, save_kwargs = _FORMATS[cfg.image_format]
    buf = io.BytesIO()
    sized.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue(), "png" if cfg.image_format == "png" else "jpg", "encoded"


@dataclass(frozen=True)
class ShardPartition:
    """One shard's work: its rows (sorted by key), the tar to write and its index part."""

    tar: Path
    index: Path
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class ShardWorker:
    """Writes one shard (the compute engine's worker): tar first, then its index part (the completion mark)."""

    image_root: Path
    cfg: ShardConfig

    def __call__(self, part: ShardPartition) -> int:
        """Returns the number of samples written now (0 when the shard was already complete)."""
        with partition_lock(part.index):
            if part.index.is_file():
                return 0
            index = []

            def write(fh: Any) -> None:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for row in part.rows:
                        bucket = (int(row["bucket_width"]), int(row["bucket_height"]))
                        data, ext, how = _encoded(self.image_root / row["path"], bucket, self.cfg)
                        meta = _sidecar(pd.Series(row))
                        _add_member(tar, f"{row['key']}.{ext}", data)
                        _add_member(tar, f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode())
                        index.append({"key": row["key"], "shard": part.tar.name, "image": f"{row['key']}.{ext}",
                                      "bucket_width": bucket[0], "bucket_height": bucket[1],
                                      "caption": meta["caption"], "aesthetics": meta["aesthetics"],
                                      "in_stage2": meta["in_stage2"], "in_vae": meta["in_vae"], "stored": how})

            atomic_write(part.tar, write)
            atomic_parquet(pd.DataFrame(index, columns=_INDEX_COLUMNS), part.index)
            return len(index)


def write_shards(rows: pd.DataFrame, image_root: Path | str, out_dir: Path | str,
                 cfg: ShardConfig | None = None, progress: bool = True,
                 compute: ComputeConfig | None = None) -> ShardSummary:
    """Write ``rows`` (needs ``key``, ``path`` relative to ``image_root``, ``bucket_width``, ``bucket_height``)
    into key-range shards ``shard-p*.tar`` and ``index.parquet`` under ``out_dir``."""
    cfg = cfg or ShardConfig()
    missing = {"key", "path", "bucket_width", "bucket_height"} - set(rows.columns)
    if missing:
        raise UltraFluxError(f"shard rows lack columns {sorted(missing)}: run `ultraflux data bucket` first")
    out, root = Path(out_dir).resolve(), Path(image_root).resolve()  # absolute: Ray workers may run elsewhere
    count, groups = split_by_key(rows, cfg.samples_per_shard)
    settings = cfg.model_dump(mode="json")
    partitions = []
    for index, group in groups:
        records = json.loads(group.to_json(orient="records"))  # plain JSON values: hashable and picklable
        name = part_name(index, count, content_hash([settings, records]), "")
        partitions.append(ShardPartition(out / f"shard-{name}.tar", out / PARTS / f"{name}.parquet", records))
    todo = [p for p in partitions if not p.index.is_file()]
    written = sum(map_partitions(functools.partial(ShardWorker, root, cfg), todo, compute, desc="shard",
                                 progress=progress))
    with stage_lock(out, "shard"):
        frames = [pd.read_parquet(p.index) for p in partitions]
        index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_INDEX_COLUMNS)
        atomic_parquet(index, out / INDEX)
        keep = {p.tar for p in partitions} | {p.index for p in partitions}
        for stale in [*out.glob("shard-*.tar"), *(out / PARTS).glob("*.parquet")]:
            if stale not in keep:
                stale.unlink(missing_ok=True)
    return ShardSummary(samples=len(index), shards=len(partitions), written=written,
                        kept_original=int((index["stored"] == "original").sum()))


def read_shard_index(shard_dir: Path | str) -> pd.DataFrame:
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise UltraFluxError(f"{shard_dir} has no {INDEX}: run `ultraflux data shard` first")
    return pd.read_parquet(path)


def read_shard_sample(tar: tarfile.TarFile, row: pd.Series | dict[str, Any]) -> ShardSample:
    """The sample an index ``row`` (``key``, ``image``) names, read from the open shard ``tar`` in memory."""
    image_member = tar.extractfile(row["image"])
    meta_member = tar.extractfile(f"{row['key']}.json")
    if image_member is None or meta_member is None:
        raise UltraFluxError(f"{tar.name} lacks the members of sample {row['key']}; rewrite the shards")
    image = Image.open(io.BytesIO(image_member.read()))
    image.load()
    return ShardSample(key=row["key"], image=image.convert("RGB"), meta=json.loads(meta_member.read()))


def iter_shards(shard_dir: Path | str) -> Iterator[ShardSample]:
    """Every sample of a shard folder, in index order. Members are read in memory (never extracted)."""
    shard_dir = Path(shard_dir)
    index = read_shard_index(shard_dir)
    for shard, group in index.groupby("shard", sort=True):
        with tarfile.open(shard_dir / str(shard), "r") as tar:
            for _, row in group.iterrows():
                yield read_shard_sample(tar, row)
