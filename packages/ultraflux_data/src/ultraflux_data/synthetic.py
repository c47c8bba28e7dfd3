"""Deterministic procedural dataset for the demo and the tests.

Each good image is a colour gradient with a texture (noise, stripes, checks) and one to three shapes, at one of
many aspect ratios, with an English caption that names what is drawn. On top of the good images a fixed set of
files exercises every branch of ingest and filtering: a flat image, a low-resolution one, a tiny one, a truncated
JPEG, a non-image, a duplicate, and odd-but-valid encodings (CMYK, palette, alpha, 16-bit, EXIF-rotated).
The folder holds ``metadata.jsonl`` (``file_name`` + caption fields), the format ``ingest`` reads for folders.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASPECT_RATIOS: tuple[tuple[str, float], ...] = (
    ("1:1", 1.0), ("4:3", 4 / 3), ("3:4", 3 / 4), ("16:9", 16 / 9), ("9:16", 9 / 16), ("2:1", 2.0), ("1:2", 0.5),
    ("2.39:1", 2.39), ("1:2.39", 1 / 2.39), ("3:2", 1.5), ("2:3", 2 / 3), ("5:4", 1.25),
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("noisy", "striped", "checkered")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "centre": (0.5, 0.5),
             "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
METADATA_FILE = "metadata.jsonl"


def image_size(aspect: float, base_side: int) -> tuple[int, int]:
    """(width, height) with about ``base_side²`` pixels at ``aspect`` = width / height."""
    return max(1, round(base_side * math.sqrt(aspect))), max(1, round(base_side / math.sqrt(aspect)))


def _background(rng: np.random.Generator, width: int, height: int, texture: str) -> np.ndarray:
    """A full-range diagonal gradient between two random colours plus a texture: ``[H, W, 3]`` uint8.

    The gradient spans most grey levels and the texture adds high-frequency detail, so good images pass the
    entropy (≥ 7 bits) and flatness filters.
    """
    lo, hi = rng.integers(0, 60, 3), rng.integers(195, 256, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = ((xx / max(width - 1, 1)) + (yy / max(height - 1, 1))) / 2.0
    img = lo[None, None, :] + ramp[..., None] * (hi - lo)[None, None, :]
    period = int(rng.integers(6, 16))
    if texture == "striped":
        img += 30.0 * np.sin(2 * np.pi * xx / period)[..., None]
    elif texture == "checkered":
        img += 25.0 * (((xx // period) + (yy // period)) % 2 * 2 - 1)[..., None]
    img += rng.normal(0.0, 20.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)


def render_sample(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    """One procedural RGB image and its caption."""
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    image = Image.fromarray(_background(rng, width, height, texture))
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        where = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        fx, fy = POSITIONS[where]
        radius = min(width, height) * float(rng.uniform(0.08, 0.2))
        _draw_shape(draw, shape, (fx * width, fy * height), radius, COLOURS[colour])
        parts.append(f"a {colour} {shape} at the {where}")
    caption = ", ".join(parts) + f" on a {texture} gradient background"
    return image, caption


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _odd_files(rng: np.random.Generator, base_side: int, first: Image.Image) -> dict[str, tuple[bytes, str]]:
    """File name → (bytes, caption) for the deliberately bad or oddly encoded inputs."""
    w, h = image_size(4 / 3, base_side)
    files: dict[str, tuple[bytes, str]] = {}

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    flat = Image.new("RGB", (w, h), (90, 120, 160))
    files["bad_flat.png"] = (png(flat), "a plain blue-grey wall")
    low, cap = render_sample(rng, *image_size(16 / 9, max(base_side // 3, 24)))
    files["bad_lowres.png"] = (png(low), cap)
    files["bad_tiny.png"] = (png(Image.new("RGB", (20, 12), (200, 10, 10))), "a tiny red thumbnail")
    good, cap = render_sample(rng, w, h)
    full = _jpeg_bytes(good)
    files["bad_truncated.jpg"] = (full[: len(full) // 2], cap)
    files["bad_not_an_image.jpg"] = (b"this is a text file with an image extension\n" * 4, "not an image")
    buf = io.BytesIO()
    first.save(buf, format="PNG")
    files["odd_duplicate.png"] = (buf.getvalue(), "a duplicate of the first image")

    odd, cap = render_sample(rng, w, h)
    files["odd_cmyk.jpg"] = (_jpeg_bytes(odd.convert("CMYK")), cap)
    odd, cap = render_sample(rng, w, h)
    files["odd_palette.png"] = (png(odd.quantize(colors=256)), cap)
    odd, cap = render_sample(rng, w, h)
    rgba = odd.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(128, 256, (h, w), dtype=np.uint8)))
    files["odd_alpha.png"] = (png(rgba), cap)
    odd, cap = render_sample(rng, w, h)
    gray16 = (np.asarray(odd.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["odd_gray16.png"] = (png(Image.fromarray(gray16)), "a grayscale 16-bit version of: " + cap)
    odd, cap = render_sample(rng, w, h)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display; stored sideways
    files["odd_exif_rotated.jpg"] = (_jpeg_bytes(odd.transpose(Image.Transpose.ROTATE_90), exif=exif), cap)
    return files


def write_synthetic_dataset(out_dir: Path | str, n: int = 24, seed: int = 0, base_side: int = 320) -> Path:
    """Write ``n`` good images (PNG and JPEG, many aspect ratios) plus the odd/bad set and ``metadata.jsonl``.

    Deterministic in (n, seed, base_side): the same call writes byte-identical files. Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    first: Image.Image | None = None
    for i in range(n):
        ratio_name, ratio = ASPECT_RATIOS[i % len(ASPECT_RATIOS)]
        image, caption = render_sample(rng, *image_size(ratio, base_side))
        first = first or image
        name = f"img_{i:04d}.{'png' if i % 2 == 0 else 'jpg'}"
        if name.endswith(".png"):
            image.save(out / name, format="PNG")
        else:
            (out / name).write_bytes(_jpeg_bytes(image))
        records.append({"file_name": name, "caption_en": caption, "aspect_ratio": ratio_name,
                        "width": image.width, "height": image.height})
    assert first is not None
    for name, (data, caption) in _odd_files(rng, base_side, first).items():
        (out / name).write_bytes(data)
        records.append({"file_name": name, "caption_en": caption})
    with open(out / METADATA_FILE, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    return out
