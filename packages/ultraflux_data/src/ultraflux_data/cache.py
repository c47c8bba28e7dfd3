"""Latent and text-embedding caches: the writer side (the format and its reader are the model's,
``ultraflux_model.training.latent_cache``).

One safetensors file per sample holds what the DiT trainer needs and nothing it must recompute:
``latents`` float32 ``[16, H/16, W/16]`` (F16 VAE posterior mean, already ``(mean − shift) · scale``),
``prompt_embeds`` ``[L, D]`` (T5 sequence) and ``pooled`` ``[P]`` (CLIP pooled), with bucket, aesthetics and
key as string metadata. The file name is a hash of (image key, bucket, caption, text length, dtype) inside a
folder named by the model hash (the fingerprints of ``vae/``, both text encoders and tokenizers), so a re-run
with the same inputs and weights reuses every file and new weights never read stale latents.
``index.parquet`` lists the entries of the latest build; the transformer is never loaded.

One partition is one shard (or, for a manifest source, one key-hash range): ``ultraflux_data.compute`` runs
:class:`CacheWorker` in this process or as a Ray Data actor pool (``compute.workers`` actors of
``compute.gpus_per_worker`` GPUs each, models loaded once per actor). Each partition writes its entries and then
its index part under ``parts/<model hash>/`` (the completion mark) under a per-partition lock; the index is
committed by rename at the end, so re-runs and concurrent runs skip finished partitions.

A sample whose image cannot be read (a corrupt shard member or manifest file, a missing member, an unreadable
shard) is quarantined, not fatal: it is listed with its reason in ``quarantine.parquet`` (``key``, ``reason``,
written with the index) and counted in the summary, and every other sample is cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel
from safetensors.torch import save_file
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import Dtype
from ultraflux_model.training.latent_cache import INDEX, INDEX_COLUMNS

from ultraflux_data.bucketing import add_bucket_columns, resize_center_crop
from ultraflux_data.compute import map_partitions
from ultraflux_data.config import ComputeConfig
from ultraflux_data.ingest import MANIFEST, read_manifest
from ultraflux_data.partitions import atomic_parquet, content_hash, part_name, partition_lock, split_by_key
from ultraflux_data.shards import INDEX as SHARD_INDEX
from ultraflux_data.shards import read_shard_index, read_shard_sample

if TYPE_CHECKING:
    from ultraflux_model.modules.text_encoders import TextEncoders

TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# What a damaged shard member raises: PIL's decode errors, a missing member, a broken JSON sidecar.
_UNREADABLE = (OSError, ValueError, KeyError, SyntaxError, struct.error, tarfile.TarError, Image.DecompressionBombError)


class CacheSummary(BaseModel):
    entries: int
    reused: int
    encoded: int
    model_hash: str
    quarantined: int = 0


@dataclass
class _Sample:
    key: str
    image: Image.Image  # already bucket-sized
    caption: str
    aesthetics: float
    flags: dict[str, bool]

    @property
    def bucket(self) -> tuple[int, int]:
        return self.image.size


def model_hash(model_dir: Path | str, max_sequence_length: int, dtype: Dtype) -> str:
    """Hash of everything that changes cache values: VAE, text encoders, tokenizers, text length, dtype."""
    from ultraflux_model.checkpoint.layout import fingerprint

    root = Path(model_dir)
    parts = {}
    for part in ("vae", *TEXT_PARTS):
        if not (root / part).is_dir():
            raise UltraFluxError(f"{root} has no {part}/: the caches need the VAE, both text encoders and tokenizers")
        parts[part] = fingerprint(root / part)
    payload = json.dumps({"parts": parts, "max_sequence_length": max_sequence_length, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_models(model_dir: Path, dtype: Dtype, device: str) -> tuple[Any, TextEncoders]:
    """The VAE and the text encoders only: the transformer is never needed for caches."""
    from ultraflux_model.modules.text_encoders import TORCH_DTYPES, load_text_encoders
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    vae = UltraFluxAutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=TORCH_DTYPES[dtype]).to(device).eval()
    return vae, load_text_encoders(model_dir, dtype=dtype, device=device)


@torch.no_grad()
def encode_images(vae: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """Bucket-sized RGB images (all the same size) → DiT latents float32 ``[B, 16, H/16, W/16]``.

    Pixels go to ``[-1, 1]``; the posterior mean is shifted and scaled as the DiT sees it:
    ``(mean − shift_factor) · scaling_factor``.
    """
    param = next(vae.parameters())
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    pixels = (pixels.to(param.device, torch.float32) / 127.5 - 1.0).to(param.dtype)
    mean = vae.encode(pixels).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return ((mean.float() - shift) * vae.config.scaling_factor).cpu()


def _entry_name(sample: _Sample, max_sequence_length: int, dtype: Dtype) -> str:
    payload = json.dumps([sample.key, list(sample.bucket), sample.caption, max_sequence_length, dtype])
    return hashlib.sha256(payload.encode()).hexdigest()[:32] + ".safetensors"


@dataclass(frozen=True)
class CachePartition:
    """One partition's work: a shard of ``source`` (``shard`` set) or manifest rows (already bucketed)."""

    index: Path
    source: Path
    shard: str | None
    rows: list[dict[str, Any]]


def _partition_samples(part: CachePartition) -> Iterator[_Sample | tuple[str, str]]:
    """The partition's samples, bucket-sized; ``(key, reason)`` for a sample whose image cannot be read."""
    if part.shard is not None:
        try:
            tar = tarfile.open(part.source / part.shard, "r")
        except (OSError, tarfile.TarError) as err:  # the whole shard is unreadable: each of its samples says so
            for row in part.rows:
                yield row["key"], f"unreadable shard {part.shard}: {err}"
            return
        with tar:
            for row in part.rows:
                try:
                    item = read_shard_sample(tar, row)
                except _UNREADABLE as err:  # one bad sample is quarantined; the shard goes on
                    yield row["key"], f"corrupt: {part.shard}/{row['image']}: {err}"
                    continue
                yield _Sample(item.key, item.image, item.meta["caption"], float(item.meta["aesthetics"]),
                              {"in_stage2": bool(item.meta["in_stage2"]), "in_vae": bool(item.meta["in_vae"])})
        return
    for row in part.rows:
        try:
            with Image.open(part.source.parent / row["path"]) as image:
                sized = resize_center_crop(image, (int(row["bucket_width"]), int(row["bucket_height"])))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            yield row["key"], f"corrupt: {err}"
            continue
        caption, aesthetics = row.get("caption_en"), row.get("aesthetics_score")
        yield _Sample(row["key"], sized, caption if isinstance(caption, str) else "",
                      float(aesthetics) if aesthetics is not None and not pd.isna(aesthetics) else 0.0,
                      {"in_stage2": False, "in_vae": False})


class CacheWorker:
    """Encodes partitions into entries (the compute engine's worker); the models load on the first miss."""

    def __init__(self, model_dir: Path, out: Path, digest: str, max_sequence_length: int, batch_size: int,
                 dtype: Dtype, device: str) -> None:
        self.model_dir, self.out, self.digest = model_dir, out, digest
        self.max_sequence_length, self.batch_size = max_sequence_length, batch_size
        self.dtype, self.device = dtype, device
        self.models: tuple[Any, TextEncoders] | None = None

    def _flush(self, group: list[tuple[_Sample, Path]]) -> None:
        from ultraflux_model.dtypes import TORCH_DTYPES
        from ultraflux_model.modules.text_encoders import encode_prompts

        if self.models is None:
            self.models = _load_models(self.model_dir, self.dtype, self.device)
        vae, text = self.models
        latents = encode_images(vae, [s.image for s, _ in group])
        embeds, pooled = encode_prompts(text, [s.caption for s, _ in group], self.max_sequence_length,
                                        device=self.device, dtype=TORCH_DTYPES[self.dtype])
        for i, (sample, path) in enumerate(group):
            tensors = {"latents": latents[i].contiguous(), "prompt_embeds": embeds[i].cpu().contiguous(),
                       "pooled": pooled[i].cpu().contiguous()}
            meta = {"key": sample.key, "bucket": json.dumps(list(sample.bucket)), "caption": sample.caption,
                    "aesthetics": repr(sample.aesthetics), "model_hash": self.digest}
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)

    def __call__(self, part: CachePartition) -> tuple[int, int]:
        """``(encoded, reused)`` entries of the partition; ``(0, 0)`` when it was already complete."""
        with partition_lock(part.index):
            if part.index.is_file():
                return 0, 0
            entries_dir = self.out / "entries" / self.digest[:16]
            entries_dir.mkdir(parents=True, exist_ok=True)
            rows: list[dict[str, Any]] = []
            pending: dict[tuple[int, int], list[tuple[_Sample, Path]]] = {}
            encoded = reused = 0
            for sample in _partition_samples(part):
                if isinstance(sample, tuple):
                    rows.append({"key": sample[0], "error": sample[1]})
                    continue
                path = entries_dir / _entry_name(sample, self.max_sequence_length, self.dtype)
                rows.append({"key": sample.key, "file": str(path.relative_to(self.out)),
                             "bucket_width": sample.bucket[0], "bucket_height": sample.bucket[1],
                             "aesthetics": sample.aesthetics, "caption": sample.caption, **sample.flags, "error": ""})
                if path.is_file():
                    reused += 1
                    continue
                group = pending.setdefault(sample.bucket, [])
                group.append((sample, path))
                if len(group) == self.batch_size:
                    self._flush(pending.pop(sample.bucket))
                    encoded += self.batch_size
            for group in pending.values():
                self._flush(group)
                encoded += len(group)
            atomic_parquet(pd.DataFrame(rows, columns=[*INDEX_COLUMNS, "error"]), part.index)
            return encoded, reused


def _partitions(source: Path, parts_dir: Path, family: str, per_partition: int,
                settings: dict[str, Any]) -> list[CachePartition]:
    """One partition per shard of a shard folder, or per key range of an ingest manifest (bucketed here)."""
    if (source / SHARD_INDEX).is_file():
        index = read_shard_index(source)
        out = []
        for shard, group in index.groupby("shard", sort=True):
            rows = json.loads(group.to_json(orient="records"))
            name = f"{Path(str(shard)).stem}-{content_hash([settings, rows])}.parquet"
            out.append(CachePartition(parts_dir / name, source, str(shard), rows))
        return out
    manifest_path = source / MANIFEST if source.is_dir() else source
    frame = add_bucket_columns(read_manifest(manifest_path), family)
    count, groups = split_by_key(frame, per_partition)
    out = []
    for index, group in groups:
        rows = json.loads(group.to_json(orient="records"))
        name = part_name(index, count, content_hash([settings, rows]), ".parquet")
        out.append(CachePartition(parts_dir / name, manifest_path, None, rows))
    return out


def build_caches(shard_or_manifest: Path | str, model_dir: Path | str, out_dir: Path | str, *,
                 max_sequence_length: int = 32, batch_size: int = 4, dtype: Dtype = "fp32", device: str = "cpu",
                 family: str = "256", progress: bool = True, compute: ComputeConfig | None = None) -> CacheSummary:
    """Encode every sample of a shard folder (or an ingest manifest, bucketed with ``family``) into ``out_dir``.

    Entries that already exist for this model hash are reused without loading any model; partitions whose index
    part exists are skipped without opening their shard.
    """
    from ultraflux_model.checkpoint.resolve import resolve_checkpoint

    compute = compute or ComputeConfig()
    source, out = Path(shard_or_manifest).resolve(), Path(out_dir).resolve()  # absolute: for Ray workers
    if not source.exists():
        raise UltraFluxError(f"cache source {source} does not exist: pass a shard folder or an ingest manifest")
    model_dir = Path(resolve_checkpoint(model_dir)).resolve()  # a local folder, or a hub snapshot (safetensors)
    digest = model_hash(model_dir, max_sequence_length, dtype)
    parts = _partitions(source, out / "parts" / digest[:16], family, compute.partition_size, {"model": digest})
    todo = [p for p in parts if not p.index.is_file()]
    worker = functools.partial(CacheWorker, model_dir, out, digest, max_sequence_length, batch_size, dtype,
                               device)
    counts = map_partitions(worker, todo, compute, gpu=True, desc="cache", progress=progress)
    encoded = sum(c[0] for c in counts)
    frames = [pd.read_parquet(p.index) for p in parts]
    done = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*INDEX_COLUMNS, "error"])
    bad = done[done["error"] != ""]
    frame = done[done["error"] == ""][INDEX_COLUMNS].reset_index(drop=True)
    frame["model_hash"] = digest
    atomic_parquet(bad[["key", "error"]].rename(columns={"error": "reason"}), out / "quarantine.parquet")
    atomic_parquet(frame, out / INDEX)
    return CacheSummary(entries=len(frame), reused=len(frame) - encoded, encoded=encoded, model_hash=digest,
                        quarantined=len(bad))
