"""Aspect-ratio presets of the web app, taken from the one bucket table (``ultraflux_model/buckets.py``)."""

from __future__ import annotations

from ultraflux_model.buckets import assign_bucket
from ultraflux_model.config import TOKEN_PX, nearest_valid_size

ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16),
    "2:1": (2, 1), "1:2": (1, 2), "2.39:1": (239, 100),
}  # fmt: skip
FAMILIES: dict[str, str] = {"1K": "1k", "2K": "2k", "4K": "4k"}
CUSTOM = "custom"  # what the aspect and size controls show for a typed size that is no preset


def preset_size(aspect: str, family: str) -> tuple[int, int]:
    """The trained bucket of ``family`` (1K, 2K, 4K) nearest to ``aspect`` (e.g. ``"16:9"`` at 4K → 5440×3072)."""
    w, h = ASPECTS[aspect]
    bucket = assign_bucket(w, h, FAMILIES[family])
    return bucket.width, bucket.height


def controls_for(width: float | None, height: float | None) -> tuple[str, str]:
    """``(aspect, family)`` the controls show for a typed size: the preset it equals, else ``CUSTOM`` for both."""
    for family in FAMILIES:
        for aspect in ASPECTS:
            if preset_size(aspect, family) == (width, height):
                return aspect, family
    return CUSTOM, CUSTOM


def size_note(width: float | None, height: float | None, max_pixels: int) -> str:
    """The inline check under the width/height fields (Markdown): valid, or the nearest valid size."""
    if width is None or height is None:
        return "enter a width and a height"
    w, h = int(width), int(height)
    if w != width or h != height or w <= 0 or h <= 0 or w % TOKEN_PX or h % TOKEN_PX:
        nw, nh = nearest_valid_size(int(round(width)), int(round(height)))
        return f"⚠ {width:g}×{height:g} is not valid: sides must be multiples of {TOKEN_PX}. Nearest valid size: **{nw}×{nh}**"
    if w * h > max_pixels:
        return f"⚠ {w}×{h} = {w * h / 1e6:.1f} MP is over this server's limit of {max_pixels / 1e6:.1f} MP per image"
    return f"✓ {w}×{h} · {w * h / 1e6:.2f} MP · {w // TOKEN_PX * (h // TOKEN_PX)} tokens"
