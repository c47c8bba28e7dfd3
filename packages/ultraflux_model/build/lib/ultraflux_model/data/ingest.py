"""Ingest with quarantine: every input becomes one manifest row, ``ok`` or ``quarantined`` with a reason.

Sources: a folder of images (captions
from a ``metadata.{jsonl,parquet,csv}`` at its top, matched by ``file_name``), or a metadata file whose
``image_url``s are http(s) (downloaded safely), ``file://`` URLs or paths relative to the file.

Odd-but-valid images are normalised to 8-bit RGB: EXIF orientation applied, alpha composited over white,
CMYK/palette/greyscale converted, 16-bit reduced to its high byte (the eval package's ``load_rgb``, the one
decoder shared with scoring). Those are stored as PNG; images that need nothing keep their original bytes.
Stored files are named by the sha256 of their bytes, which is the sample ``key`` and de-duplicates content.
Quarantined: unreadable, non-image, truncated/corrupt, decompression bombs (``max_pixels``, and PIL's own
limit turned from a warning into an error), tiny, unsupported pixel modes, duplicates, failed downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel
from tqdm import tqdm
from ultraflux_eval.errors import EvalError
from ultraflux_eval.scores import load_rgb

from ultraflux_model.config import DataConfig, IngestConfig
from ultraflux_model.data.download import download_urls
from ultraflux_model.data.metadata import METADATA_SUFFIXES, SampleRecord, read_metadata
from ultraflux_model.errors import UltraFluxError

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                    "I;16", "I;16B", "I;16L", "I;16N"}
_NUMERIC_FIELDS = ("qalign_score", "aesthetics_score", "flat_percentage", "shannon_entropy")
_RECORD_FIELDS = [name for name in SampleRecord.model_fields if name not in ("image_url", "file_name")]


class Quarantine(Exception):
    """An input that cannot become a training image; the message is the manifest ``reason``."""


class IngestSummary(BaseModel):
    """Counts of one ingest run."""

    total: int
    ok: int
    quarantined: int
    reasons: dict[str, int]

    def text(self) -> str:
        lines = [f"ingested {self.total}: {self.ok} ok, {self.quarantined} quarantined"]
        lines += [f"  {count:5d}  {reason}" for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def normalise_image(path: Path, cfg: IngestConfig) -> tuple[Image.Image, list[str], str]:
    """Decode ``path`` into an RGB image, or raise :class:`Quarantine`.

    Returns ``(rgb_image, steps, format)`` where ``steps`` names what was changed (empty = the file is already
    a plain RGB JPEG/PNG/WebP and its bytes can be kept).
    """
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice its limit and would then decode the bomb: make it an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Quarantine(f"decompression bomb: {err}") from err
        except UnidentifiedImageError as err:
            raise Quarantine("not an image: no known image format") from err
        except (PermissionError, FileNotFoundError, IsADirectoryError) as err:
            raise Quarantine(f"unreadable: {err}") from err
        except (OSError, ValueError, SyntaxError, struct.error) as err:  # header cut short or malformed
            raise Quarantine(f"corrupt: {err}") from err
        with opened:
            width, height = opened.size
            if width * height > cfg.max_pixels:
                raise Quarantine(
                    f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels={cfg.max_pixels}"
                )
            if min(width, height) < cfg.min_side:
                raise Quarantine(f"tiny: {width}x{height}, shorter side below min_side={cfg.min_side}")
            if opened.mode not in _SUPPORTED_MODES:
                raise Quarantine(f"unsupported pixel mode: {opened.mode} (convert to 8- or 16-bit RGB/greyscale)")
            fmt = opened.format or ""
            try:
                opened.load()
            except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as err:
                raise Quarantine(f"corrupt: {err}") from err
            steps: list[str] = []
            image: Image.Image = opened
            if image.getexif().get(0x0112, 1) != 1:
                image = ImageOps.exif_transpose(image)
                steps.append("exif_transpose")
            has_alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
                image.mode == "P" and "transparency" in image.info
            )
            if has_alpha:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba).convert("RGB")
                steps.append("alpha_over_white")
            if image.mode != "RGB":
                steps.append(f"{image.mode}_to_rgb")
            try:
                rgb = Image.fromarray(np.ascontiguousarray(load_rgb(image)))
            except EvalError as err:
                raise Quarantine(f"corrupt: {err}") from err
            if fmt not in _KEEP_FORMATS and not steps:
                steps.append(f"{fmt or 'unknown'}_to_png")
            return rgb, steps, fmt


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _folder_inputs(folder: Path, out: Path) -> list[tuple[str, Path | None, SampleRecord | None, str]]:
    """``(source, local_path, record, failure)`` for every file of a folder (metadata file, hidden files and the
    output folder, if it lies inside, excluded)."""
    metadata = next((folder / f"metadata{s}" for s in METADATA_SUFFIXES if (folder / f"metadata{s}").is_file()), None)
    by_name: dict[str, SampleRecord] = {}
    if metadata is not None:
        records, _ = read_metadata(metadata)
        by_name = {r.file_name or r.image_url or "": r for r in records}
    # An output folder inside the source must not be read back as input on a re-run.
    skip = out.resolve() if out.resolve().is_relative_to(folder.resolve()) else None
    inputs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path == metadata or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        inputs.append((rel, path, by_name.get(rel), ""))
    return inputs


def _metadata_inputs(meta_path: Path, out: Path, data_cfg: DataConfig,
                     progress: bool) -> list[tuple[str, Path | None, SampleRecord | None, str]]:
    records, report = read_metadata(meta_path)
    inputs: list[tuple[str, Path | None, SampleRecord | None, str]] = [
        (f"{meta_path.name}:row{e.row}", None, None, f"bad metadata row: {e.reason}") for e in report.invalid
    ]
    urls = [r.location for r in records if r.location and r.location.startswith(("http://", "https://"))]
    downloads = download_urls(urls, out / "downloads", data_cfg.download, progress=progress) if urls else {}
    for record in records:
        location = record.location or ""
        if location in downloads:
            result = downloads[location]
            if result.status == "failed":
                inputs.append((location, None, record, f"download failed: {result.reason}"))
            else:
                inputs.append((location, out / "downloads" / (result.path or ""), record, ""))
        else:
            local = Path(location[len("file://"):]) if location.startswith("file://") else Path(location)
            if "://" in location and not location.startswith("file://"):
                inputs.append((location, None, record, f"unsupported URL scheme in {location!r}"))
                continue
            inputs.append((location, local if local.is_absolute() else meta_path.parent / local, record, ""))
    return inputs


def _row(source: str, record: SampleRecord | None) -> dict[str, Any]:
    row: dict[str, Any] = {"source": source, "key": None, "path": None, "status": "quarantined", "reason": "",
                           "width": None, "height": None, "format": None, "normalised": ""}
    for name in _RECORD_FIELDS:
        row[name] = getattr(record, name) if record is not None else None
    row["extra"] = json.dumps(record.extra_fields(), default=str, sort_keys=True) if record is not None else "{}"
    return row


def ingest(source: Path | str, out_dir: Path | str, data_cfg: DataConfig | None = None,
           progress: bool = True) -> IngestSummary:
    """Ingest a folder or metadata file into ``out_dir`` (``images/``, ``manifest.parquet``, ``summary.json``).

    Never raises for a bad input file; raises ``UltraFluxError`` only when ``source`` itself is missing.
    """
    data_cfg = data_cfg or DataConfig()
    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        inputs = _folder_inputs(source, out)
    elif source.is_file():
        inputs = _metadata_inputs(source, out, data_cfg, progress)
    else:
        raise UltraFluxError(f"ingest source {source} is neither a folder nor a metadata file")
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for src, path, record, failure in tqdm(inputs, desc="ingest", unit="file", disable=not progress):
        row = _row(src, record)
        rows.append(row)
        try:
            if failure:
                raise Quarantine(failure)
            assert path is not None
            if not path.is_file():
                raise Quarantine(f"unreadable: {path} does not exist")
            image, steps, fmt = normalise_image(path, data_cfg.ingest)
            row.update(width=image.width, height=image.height, format=fmt, normalised=",".join(steps))
            if steps:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
            else:
                data, ext = path.read_bytes(), _KEEP_FORMATS[fmt]
            key = _sha256(data)
            if key in seen:
                raise Quarantine(f"duplicate: same content as {seen[key]}")
            seen[key] = src
            rel = f"images/{key[:2]}/{key}.{ext}"
            if not (out / rel).is_file():
                _atomic_write(out / rel, data)
            row.update(key=key, path=rel, status="ok")
        except Quarantine as err:
            row["reason"] = str(err)
    frame = pd.DataFrame(rows, columns=list(_row("", None)))
    frame = frame.astype({"width": "Int64", "height": "Int64"})
    for name in _NUMERIC_FIELDS:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    tmp = out / (MANIFEST + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, out / MANIFEST)
    reasons = Counter(r["reason"].split(":", 1)[0] for r in rows if r["status"] == "quarantined")
    ok = sum(r["status"] == "ok" for r in rows)
    summary = IngestSummary(total=len(rows), ok=ok, quarantined=len(rows) - ok, reasons=dict(reasons))
    (out / SUMMARY).write_text(summary.model_dump_json(indent=2) + "\n")
    return summary


def read_manifest(path: Path | str, ok_only: bool = True) -> pd.DataFrame:
    """The manifest (only ``ok`` rows unless ``ok_only=False``); ``path`` is a manifest file or its folder."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise UltraFluxError(f"manifest {path} does not exist: run `ultraflux data ingest` first")
    frame = pd.read_parquet(path)
    return frame[frame["status"] == "ok"].reset_index(drop=True) if ok_only else frame
