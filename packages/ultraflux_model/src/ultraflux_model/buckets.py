"""Aspect-ratio buckets: the one table and nearest-log-aspect assignment.

The data package resizes and crops images into these buckets (``ultraflux_data.bucketing``); training batches
them one bucket at a time (``ultraflux_model.training.sampler``).

The 4K family holds 15 buckets of about 16.7 MP (4096² = 16,777,216 px), every side a multiple of 32 (one
transformer token is 32×32 px). 4096×4096, 5440×3072, 3072×5440, 6336×2624 and 4608×3648 are the sizes named
by the paper; the others fill the aspect-ratio range (1:1 … 2.41:1, both orientations) at the same area. Lower
resolution families (2K, 1K, 512, 256) are the 4K table scaled by 1/2 … 1/16 with each side rounded to a multiple
of 32 (duplicates after rounding removed), so every training stage buckets with the same aspect ratios.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import TOKEN_PX


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
