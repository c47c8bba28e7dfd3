"""Training shards: tar files of bucket-sized images plus a JSON sidecar per sample (webdataset layout).

Each sample ``<key>`` is two members, ``<key>.png`` (or ``.jpg``) already resized and centre-cropped to its
bucket, and ``<key>.json`` with caption, bucket, aesthetics score and subset flags. ``index.parquet`` lists
every sample with its shard, so readers can select subsets without opening the tars. Tars are written
deterministically (sorted keys, zero mtimes and ids) so the same inputs give byte-identical shards and DVC
sees no change on a re-run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from pydantic import BaseModel
from tqdm import tqdm

from ultraflux_model.config import ShardConfig
from ultraflux_model.data.buckets import resize_center_crop
from ultraflux_model.errors import UltraFluxError

INDEX = "index.parquet"
_FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95})}


@dataclass(frozen=True)
class ShardSample:
    """One sample read back from a shard: the bucket-sized RGB image and its sidecar."""

    key: str
    image: Image.Image
    meta: dict[str, Any]


class ShardSummary(BaseModel):
    samples: int
    shards: int


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


def write_shards(rows: pd.DataFrame, image_root: Path | str, out_dir: Path | str,
                 cfg: ShardConfig | None = None, progress: bool = True) -> ShardSummary:
    """Write ``rows`` (needs ``key``, ``path`` relative to ``image_root``, ``bucket_width``, ``bucket_height``)
    into ``shard-00000.tar``, … and ``index.parquet`` under ``out_dir``."""
    cfg = cfg or ShardConfig()
    missing = {"key", "path", "bucket_width", "bucket_height"} - set(rows.columns)
    if missing:
        raise UltraFluxError(f"shard rows lack columns {sorted(missing)}: run `ultraflux data bucket` first")
    out, root = Path(out_dir), Path(image_root)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*.tar"):
        stale.unlink()
    rows = rows.sort_values("key").reset_index(drop=True)
    fmt, save_kwargs = _FORMATS[cfg.image_format]
    ext = "png" if cfg.image_format == "png" else "jpg"
    index = []
    bar = tqdm(total=len(rows), desc="shard", unit="img", disable=not progress)
    for shard_no, start in enumerate(range(0, len(rows), cfg.samples_per_shard)):
        name = f"shard-{shard_no:05d}.tar"
        tmp = out / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for _, row in rows.iloc[start : start + cfg.samples_per_shard].iterrows():
                with Image.open(root / row["path"]) as image:
                    sized = resize_center_crop(image, (int(row["bucket_width"]), int(row["bucket_height"])))
                buf = io.BytesIO()
                sized.save(buf, format=fmt, **save_kwargs)
                meta = _sidecar(row)
                _add_member(tar, f"{row['key']}.{ext}", buf.getvalue())
                _add_member(tar, f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode())
                index.append({"key": row["key"], "shard": name, "image": f"{row['key']}.{ext}",
                              "bucket_width": meta["bucket"][0], "bucket_height": meta["bucket"][1],
                              "caption": meta["caption"], "aesthetics": meta["aesthetics"],
                              "in_stage2": meta["in_stage2"], "in_vae": meta["in_vae"]})
                bar.update()
        os.replace(tmp, out / name)
    bar.close()
    pd.DataFrame(index, columns=["key", "shard", "image", "bucket_width", "bucket_height", "caption", "aesthetics",
                                 "in_stage2", "in_vae"]).to_parquet(out / INDEX, index=False)
    return ShardSummary(samples=len(index), shards=len({r["shard"] for r in index}))


def read_shard_index(shard_dir: Path | str) -> pd.DataFrame:
    path = Path(shard_dir) / INDEX
    if not path.is_file():
        raise UltraFluxError(f"{shard_dir} has no {INDEX}: run `ultraflux data shard` first")
    return pd.read_parquet(path)


def iter_shards(shard_dir: Path | str) -> Iterator[ShardSample]:
    """Every sample of a shard folder, in index order. Members are read in memory (never extracted)."""
    shard_dir = Path(shard_dir)
    index = read_shard_index(shard_dir)
    for shard, group in index.groupby("shard", sort=True):
        with tarfile.open(shard_dir / str(shard), "r") as tar:
            for _, row in group.iterrows():
                image_member = tar.extractfile(row["image"])
                meta_member = tar.extractfile(f"{row['key']}.json")
                if image_member is None or meta_member is None:
                    raise UltraFluxError(f"{shard} lacks the members of sample {row['key']}; rewrite the shards")
                image = Image.open(io.BytesIO(image_member.read()))
                image.load()
                yield ShardSample(key=row["key"], image=image.convert("RGB"), meta=json.loads(meta_member.read()))
