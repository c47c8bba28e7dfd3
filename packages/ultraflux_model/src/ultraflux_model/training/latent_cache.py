"""The latent cache as training reads it: the format, the dataset and its collate function.

One safetensors file per sample holds what the DiT trainer needs and nothing it must recompute:
``latents`` float32 ``[16, H/16, W/16]`` (F16 VAE posterior mean, already ``(mean − shift) · scale``),
``prompt_embeds`` ``[L, D]`` (T5 sequence) and ``pooled`` ``[P]`` (CLIP pooled), with bucket, aesthetics and
key as string metadata; ``index.parquet`` (columns :data:`INDEX_COLUMNS`) lists the entries. The writer is the
data package's cache stage (``ultraflux_data.cache``); the format is defined here, where it is consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from ultraflux_core.errors import UltraFluxError

INDEX = "index.parquet"
INDEX_COLUMNS = ["key", "file", "bucket_width", "bucket_height", "aesthetics", "caption", "in_stage2", "in_vae"]


class CachedLatentDataset(Dataset):
    """Items of a cache folder: ``{"latents", "prompt_embeds", "pooled", "bucket", "aesthetics", "key"}``.

    ``subset="stage2"`` or ``"vae"`` keeps only the members of that subset (SACL stage 2 / VAE images).
    """

    def __init__(self, cache_dir: Path | str, subset: str | None = None) -> None:
        self.root = Path(cache_dir)
        path = self.root / INDEX
        if not path.is_file():
            raise UltraFluxError(f"{self.root} has no {INDEX}: run `ultraflux data cache` first")
        frame = pd.read_parquet(path)
        if subset is not None:
            column = f"in_{subset}"
            if column not in frame:
                raise UltraFluxError(f"unknown subset {subset!r}: the cache index has in_stage2 and in_vae")
            frame = frame[frame[column]]
        self.index = frame.reset_index(drop=True)
        if self.index.empty:
            raise UltraFluxError(f"the cache {self.root} has no entries{f' in subset {subset}' if subset else ''}")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def text_tokens(self) -> int:
        """T5 sequence length of the cached prompt embeddings (the cache stage's ``max_sequence_length``)."""
        with safe_open(str(self.root / self.index["file"].iloc[0]), framework="pt") as fh:
            return int(fh.get_slice("prompt_embeds").get_shape()[0])

    def bucket_keys(self) -> list[tuple[int, int]]:
        """``(width, height)`` of every item, in dataset order (the input of ``BucketBatchSampler``)."""
        pairs = zip(self.index["bucket_width"], self.index["bucket_height"], strict=True)
        return [(int(w), int(h)) for w, h in pairs]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.index.iloc[i]
        with safe_open(str(self.root / row["file"]), framework="pt") as fh:
            item: dict[str, Any] = {name: fh.get_tensor(name) for name in ("latents", "prompt_embeds", "pooled")}
        item["latents"] = item["latents"].float()
        item["bucket"] = (int(row["bucket_width"]), int(row["bucket_height"]))
        item["aesthetics"] = float(row["aesthetics"])
        item["key"] = str(row["key"])
        return item


def collate_latents(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's items: tensors gain a batch dim, ``aesthetics`` becomes a tensor, ``key`` a list."""
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise UltraFluxError(f"a batch must hold one bucket, got {sorted(buckets)}: use BucketBatchSampler")
    return {
        "latents": torch.stack([item["latents"] for item in items]),
        "prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]),
        "pooled": torch.stack([item["pooled"] for item in items]),
        "aesthetics": torch.tensor([item["aesthetics"] for item in items], dtype=torch.float32),
        "bucket": buckets.pop(),
        "key": [item["key"] for item in items],
    }
