"""Aspect-ratio buckets: the one table, nearest-log-aspect assignment, resize-then-centre-crop, the batch sampler.

The 4K family holds 15 buckets of about 16.7 MP (4096² = 16,777,216 px), every side a multiple of 32 (one
transformer token is 32×32 px). 4096×4096, 5440×3072, 3072×5440, 6336×2624 and 4608×3648 are the sizes named
by the paper; the others fill the aspect-ratio range (1:1 … 2.41:1, both orientations) at the same area. Lower
resolution families (2K, 1K, 512, 256) are the 4K table scaled by 1/2 … 1/16 with each side rounded to a multiple
of 32 (duplicates after rounding removed), so every training stage buckets with the same aspect ratios.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from ultraflux_model.config import TOKEN_PX
from ultraflux_model.errors import UltraFluxError


class Bucket(NamedTuple):
    """A training resolution ``(width, height)``; both sides are multiples of 32."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


BUCKETS_4K: tuple[Bucket, ...] = (
    Bucket(4096, 4096),
    Bucket(4352, 3840), Bucket(3840, 4352),
    Bucket(4608, 3648), Bucket(3648, 4608),
    Bucket(4992, 3328), Bucket(3328, 4992),
    Bucket(5440, 3072), Bucket(3072, 5440),
    Bucket(5760, 2880), Bucket(2880, 5760),
    Bucket(6336, 2624), Bucket(2624, 6336),
    Bucket(6144, 2752), Bucket(2752, 6144),
)
FAMILY_SCALE: dict[str, float] = {"4k": 1.0, "2k": 1 / 2, "1k": 1 / 4, "512": 1 / 8, "256": 1 / 16}


def _scaled_family(scale: float) -> tuple[Bucket, ...]:
    """The 4K table scaled by ``scale``, sides rounded to multiples of 32, first occurrence kept."""
    seen: dict[Bucket, None] = {}
    for bucket in BUCKETS_4K:
        w = max(TOKEN_PX, round(bucket.width * scale / TOKEN_PX) * TOKEN_PX)
        h = max(TOKEN_PX, round(bucket.height * scale / TOKEN_PX) * TOKEN_PX)
        seen.setdefault(Bucket(w, h), None)
    return tuple(seen)


BUCKETS: dict[str, tuple[Bucket, ...]] = {name: _scaled_family(scale) for name, scale in FAMILY_SCALE.items()}


def family_buckets(family: str) -> tuple[Bucket, ...]:
    """The bucket table of one family (``4k``, ``2k``, ``1k``, ``512``, ``256``)."""
    if family not in BUCKETS:
        raise UltraFluxError(f"unknown bucket family {family!r}; choose one of {sorted(BUCKETS)}")
    return BUCKETS[family]


def assign_bucket(width: int, height: int, family: str = "4k") -> Bucket:
    """The bucket whose log aspect ratio is nearest to ``log(width / height)`` (ties: the larger-area bucket,
    then table order)."""
    if width <= 0 or height <= 0:
        raise UltraFluxError(f"cannot bucket an image of size {width}x{height}: both sides must be positive")
    target = math.log(width / height)
    table = family_buckets(family)
    return min(table, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


def resize_center_crop(image: Image.Image, bucket: Bucket | tuple[int, int]) -> Image.Image:
    """Scale ``image`` (Lanczos) so it covers ``bucket`` with the least scaling, then crop the centre.

    Returns an RGB image of exactly ``(width, height)`` = ``bucket``. Scaling keeps the aspect ratio, so only
    the overhanging side loses pixels (split evenly, the odd pixel going to the right/bottom).
    """
    width, height = bucket
    src = image.convert("RGB") if image.mode != "RGB" else image
    scale = max(width / src.width, height / src.height)
    new_w, new_h = max(width, math.ceil(src.width * scale - 1e-9)), max(height, math.ceil(src.height * scale - 1e-9))
    if (new_w, new_h) != src.size:
        src = src.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return src.crop((left, top, left + width, top + height))


def add_bucket_columns(frame: pd.DataFrame, family: str) -> pd.DataFrame:
    """``frame`` (with ``width``, ``height``) plus ``bucket_width``, ``bucket_height`` and ``bucket`` ("WxH")."""
    buckets = [assign_bucket(int(w), int(h), family) for w, h in zip(frame["width"], frame["height"], strict=True)]
    out = frame.copy()
    out["bucket_width"] = [b.width for b in buckets]
    out["bucket_height"] = [b.height for b in buckets]
    out["bucket"] = [f"{b.width}x{b.height}" for b in buckets]
    return out


def bucket_counts(frame: pd.DataFrame, family: str) -> dict[str, int]:
    """Images per bucket of ``family`` in table order (empty buckets included, so plots are comparable)."""
    counts = frame["bucket"].value_counts().to_dict() if len(frame) else {}
    return {f"{b.width}x{b.height}": int(counts.get(f"{b.width}x{b.height}", 0)) for b in family_buckets(family)}


def bucket_histogram_png(counts: dict[str, int], out: Path | str, title: str = "images per bucket") -> Path:
    """Bar chart of ``{"WxH": count}`` written as a PNG (matplotlib, headless backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = list(counts)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 1.5), 3.2))
    ax.bar(range(len(labels)), [counts[k] for k in labels], color="#3b6ea5")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class BucketBatchSampler:
    """Batches of dataset indices where every batch holds one bucket only (a ``DataLoader`` ``batch_sampler``).

    Order is a pure function of ``(seed, epoch)``: within each bucket the indices are shuffled, cut into batches
    of ``batch_size`` (a short tail is dropped when ``drop_last``), and the batches of all buckets are shuffled
    together. With ``world_size > 1`` the global batch list is cut to a multiple of ``world_size`` (wrapped
    around when ``drop_last`` is false) and rank ``r`` takes batches ``r, r + world_size, …`` — disjoint across
    ranks and the same count on each, so collective ops never wait on a rank that ran out. With
    ``step_batches`` (gradient-accumulation rounds per optimizer step) the cut is to a multiple of
    ``world_size × step_batches``, so an epoch never ends inside an optimizer step and every split of a global
    batch over ranks and rounds sees the same batches per step.

    ``state_dict()`` records the epoch and how many batches this rank has yielded in it; after
    ``load_state_dict`` the next iteration continues with the identical remaining batches. (With DataLoader
    workers, batches are prefetched: store the number of batches the training loop consumed as ``position``.)
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        step_batches: int = 1,
    ) -> None:
        if batch_size < 1 or step_batches < 1:
            raise UltraFluxError(f"batch_size and step_batches must be at least 1, got {batch_size}, {step_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UltraFluxError(f"rank {rank} is not in [0, world_size={world_size})")
        self._groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, key in enumerate(bucket_keys):
            self._groups[key].append(index)
        # A fixed bucket order independent of hashing/insertion: sort by repr.
        self._keys = sorted(self._groups, key=repr)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.step_batches = step_batches
        self.epoch = 0
        self.position = 0

    def _global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for key in self._keys:
            indices = np.array(self._groups[key])[rng.permutation(len(self._groups[key]))].tolist()
            stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
            batches.extend(indices[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        per_step = self.world_size * self.step_batches
        if per_step > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % per_step]
            else:
                short = (-len(batches)) % per_step
                batches = batches + (batches * (short // len(batches) + 1))[:short]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        return self._global_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        # A finished epoch starts again from its first batch if iterated once more without set_epoch.
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; the in-epoch position resets only when the epoch changes."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "step_batches": self.step_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("seed", "batch_size", "world_size", "step_batches"):
            if name in state and state[name] != getattr(self, name):
                raise UltraFluxError(
                    f"sampler state was saved with {name}={state[name]} but this sampler has "
                    f"{name}={getattr(self, name)}; resume with the same data settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
