"""The data side of the aspect-ratio buckets: resize-then-centre-crop into a bucket, bucket columns of a table,
counts per bucket and their histogram. The table itself and the assignment rule are the model's
(``ultraflux_model.buckets``): training and data must agree on them."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from PIL import Image
from ultraflux_core.files import atomic_write
from ultraflux_model.buckets import Bucket, assign_bucket, family_buckets


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
    out = atomic_write(Path(out), lambda fh: fig.savefig(fh, format="png", dpi=100))  # whole or not at all
    plt.close(fig)
    return out
