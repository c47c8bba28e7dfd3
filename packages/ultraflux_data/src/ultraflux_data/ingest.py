"""Ingest with quarantine: every input becomes one manifest row, ``ok`` or ``quarantined`` with a reason.

Sources: a folder of images (captions
from a ``metadata.{jsonl,parquet,csv}`` at its top, matched by ``file_name``, or else from a ``<stem>.txt`` beside
each image, the kohya/SimpleTuner convention), or a metadata file whose
``image_url``s are http(s) (downloaded safely), ``file://`` URLs or paths relative to the file.

Odd-but-valid images are normalised to 8-bit RGB: EXIF orientation applied, alpha composited over white,
CMYK/palette/greyscale converted, 16-bit reduced to its high byte (the eval package's ``load_rgb``, the one
decoder shared with scoring). Those are stored as PNG; images that need nothing keep their original bytes.
Every input is first copied (``copy_file_range``: a reflink on filesystems that share extents copy-on-write)
into ``.staging/`` and everything after reads that copy, so a stored file never shares an inode with a user's
file (editing the source later cannot change it) and its name is the hash of exactly what was decoded. Inputs
over ``max_bytes`` are quarantined from their size before a byte is read; bytes after a kept JPEG/PNG/WebP's
end marker are quarantined (``trailing_data: quarantine``) or cut off (``strip``). Stored files are named by
the sha256 of their bytes, which is the sample ``key`` and de-duplicates content.

Inputs are cut into deterministic partitions (hash ranges of the source name) that ``ultraflux_data.compute``
runs in this process or as Ray tasks; each partition's manifest rows are written atomically under
``.parts/<settings hash>/`` (re-runs and concurrent runs skip finished ones), then the manifest is committed by
rename. Duplicates are resolved afterwards in input order, so the first occurrence keeps its row whatever ran
first.
Quarantined: unreadable, non-image, truncated/corrupt, decompression bombs (``max_pixels``, and PIL's own
limit turned from a warning into an error), too large (``max_bytes``), trailing data, tiny, unsupported pixel
modes, duplicates, failed downloads.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import TooLarge, atomic_bytes, copy_capped, file_sha256
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import load_rgb

from ultraflux_data.compute import map_partitions
from ultraflux_data.config import ComputeConfig, DataConfig, IngestConfig
from ultraflux_data.download import download_urls
from ultraflux_data.image_end import encoded_end
from ultraflux_data.metadata import METADATA_SUFFIXES, SampleRecord, read_metadata
from ultraflux_data.partitions import (
    atomic_parquet,
    content_hash,
    part_name,
    partition_lock,
    split_by_key,
)

MANIFEST = "manifest.parquet"
SUMMARY = "summary.json"
STAGING = ".staging"  # private copies of inputs being ingested (renamed into images/ or removed)
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                    "I;16", "I;16B", "I;16L", "I;16N"}
_NUMERIC_FIELDS = ("qalign_score", "aesthetics_score", "flat_percentage", "shannon_entropy")
CAPTION_SUFFIX = ".txt"  # a caption file beside an image in a folder source
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
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # A `<stem>.txt` beside an image is its caption, not an input of its own.
    captions = {p.with_suffix(CAPTION_SUFFIX) for p in files if p.suffix != CAPTION_SUFFIX}
    inputs = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if path == metadata or path in captions or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        record = by_name.get(rel)
        sidecar = path.with_suffix(CAPTION_SUFFIX)
        if record is None and sidecar in captions and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
            record = SampleRecord(file_name=rel, caption_en=caption)
        inputs.append((rel, path, record, ""))
    return inputs


def _metadata_inputs(meta_path: Path, out: Path, data_cfg: DataConfig, progress: bool,
                     compute: ComputeConfig | None = None) -> list[tuple[str, Path | None, SampleRecord | None, str]]:
    records, report = read_metadata(meta_path)
    inputs: list[tuple[str, Path | None, SampleRecord | None, str]] = [
        (f"{meta_path.name}:row{e.row}", None, None, f"bad metadata row: {e.reason}") for e in report.invalid
    ]
    urls = [r.location for r in records if r.location and r.location.startswith(("http://", "https://"))]
    downloads = download_urls(urls, out / "downloads", data_cfg.download, progress=progress,
                              compute=compute) if urls else {}
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
                           "width": None, "height": None, "format": None, "normalised": "", "stored": ""}
    for name in _RECORD_FIELDS:
        row[name] = getattr(record, name) if record is not None else None
    row["extra"] = json.dumps(record.extra_fields(), default=str, sort_keys=True) if record is not None else "{}"
    return row


@dataclass(frozen=True)
class IngestPartition:
    """Inputs ``(order, source, local path, record, failure)`` of one partition and its manifest part file."""

    out: Path
    inputs: list[tuple[int, str, str | None, SampleRecord | None, str]]


@dataclass(frozen=True)
class IngestWorker:
    """Ingests partitions (the compute engine's worker): images stored content-addressed, rows to a part file."""

    out: Path
    cfg: IngestConfig

    def _stage(self, path: Path) -> Path:
        """A private copy of ``path`` beside the store (capped at ``max_bytes``): everything after this decodes,
        hashes and stores that copy, so the stored file shares no inode with the user's and a source edited
        meanwhile cannot make a file's name differ from its content's hash."""
        size = path.stat().st_size
        if size > self.cfg.max_bytes:
            raise Quarantine(f"too large: {size} bytes > max_bytes={self.cfg.max_bytes}")
        staging = self.out / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        staged = staging / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
        try:
            copy_capped(path, staged, self.cfg.max_bytes)
        except TooLarge as err:
            raise Quarantine(f"too large: {path} grew past max_bytes={self.cfg.max_bytes} while it was read") from err
        except OSError as err:
            raise Quarantine(f"unreadable: {err}") from err
        return staged

    def _trailing(self, staged: Path, fmt: str) -> str:
        """Refuse (or cut, with ``trailing_data: strip``) bytes after the image's end; returns the step taken."""
        end = encoded_end(staged, fmt)
        if end is None:
            raise Quarantine(f"corrupt: the {fmt} structure does not reach its end marker")
        extra = staged.stat().st_size - end
        if extra <= 0:
            return ""
        if self.cfg.trailing_data == "quarantine":
            raise Quarantine(f"trailing data: {extra} bytes after the end of the {fmt} image")
        os.truncate(staged, end)
        return "trailing_data_stripped"

    def _one(self, source: str, path: Path | None, record: SampleRecord | None, failure: str) -> dict[str, Any]:
        row = _row(source, record)
        staged = None
        try:
            if failure:
                raise Quarantine(failure)
            if path is None or not path.is_file():
                raise Quarantine(f"unreadable: {path} does not exist")
            staged = self._stage(path)
            image, steps, fmt = normalise_image(staged, self.cfg)
            row.update(width=image.width, height=image.height, format=fmt, normalised=",".join(steps))
            if steps:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
                key = _sha256(data)
            else:
                data, ext = None, _KEEP_FORMATS[fmt]
                row["normalised"] = self._trailing(staged, fmt)
                key = file_sha256(staged)
            rel = f"images/{key[:2]}/{key}.{ext}"
            if (self.out / rel).is_file():
                stored = "exists"
            elif data is not None:
                atomic_bytes(self.out / rel, data)
                stored = "encoded"
            else:
                (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, self.out / rel)
                stored = "copy"
            row.update(key=key, path=rel, status="ok", stored=stored)
        except Quarantine as err:
            row["reason"] = str(err)
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        return row

    def __call__(self, part: IngestPartition) -> int:
        """Returns the number of inputs ingested now (0 when the part was already complete)."""
        with partition_lock(part.out):
            if part.out.is_file():
                return 0
            rows = [{"order": order, **self._one(src, Path(path) if path else None, record, failure)}
                    for order, src, path, record, failure in part.inputs]
            atomic_parquet(_manifest_frame(rows, order=True), part.out)
            return len(rows)


def _manifest_frame(rows: list[dict[str, Any]], order: bool = False) -> pd.DataFrame:
    columns = (["order"] if order else []) + list(_row("", None))
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({"width": "Int64", "height": "Int64"})
    for name in _NUMERIC_FIELDS:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return frame


def _input_identity(path: Path | None) -> list[Any]:
    """What makes a finished partition stale: the input file's size and modification time."""
    if path is None or not path.is_file():
        return []
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def ingest(source: Path | str, out_dir: Path | str, data_cfg: DataConfig | None = None,
           progress: bool = True, compute: ComputeConfig | None = None) -> IngestSummary:
    """Ingest a folder or metadata file into ``out_dir`` (``images/``, ``manifest.parquet``, ``summary.json``).

    Never raises for a bad input file; raises ``UltraFluxError`` only when ``source`` itself is missing.
    """
    data_cfg, compute = data_cfg or DataConfig(), compute or ComputeConfig()
    source, out = Path(source).resolve(), Path(out_dir).resolve()  # absolute: Ray workers may run elsewhere
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        inputs = _folder_inputs(source, out)
    elif source.is_file():
        inputs = _metadata_inputs(source, out, data_cfg, progress, compute)
    else:
        raise UltraFluxError(f"ingest source {source} is neither a folder nor a metadata file")
    table = pd.DataFrame({"key": [hashlib.sha256(src.encode()).hexdigest() for src, *_ in inputs],
                          "order": range(len(inputs))})
    settings = content_hash(data_cfg.ingest.model_dump(mode="json"))
    count, groups = split_by_key(table, compute.partition_size)
    parts: list[IngestPartition] = []
    for index, group in groups:
        chosen = [(int(o), src, str(path) if path else None, record, failure)
                  for o in group["order"] for src, path, record, failure in [inputs[int(o)]]]
        identity = [[o, src, path, record.model_dump(mode="json") if record else None, failure,
                     _input_identity(Path(path) if path else None)] for o, src, path, record, failure in chosen]
        name = part_name(index, count, content_hash([settings, identity]), ".parquet")
        parts.append(IngestPartition(out / ".parts" / settings / name, chosen))
    todo = [p for p in parts if not p.out.is_file()]
    map_partitions(functools.partial(IngestWorker, out, data_cfg.ingest), todo, compute, desc="ingest",
                   progress=progress)
    frame = pd.concat([pd.read_parquet(p.out) for p in parts], ignore_index=True) if parts else _manifest_frame([])
    frame = frame.sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)
    seen: dict[str, str] = {}
    for i, row in frame.iterrows():  # duplicates in input order: the first occurrence keeps its row
        if row["status"] != "ok":
            continue
        if row["key"] in seen:
            frame.loc[i, ["status", "reason", "key", "path", "stored"]] = [
                "quarantined", f"duplicate: same content as {seen[row['key']]}", None, None, ""]
        else:
            seen[row["key"]] = row["source"]
    atomic_parquet(frame, out / MANIFEST)
    quarantined = frame[frame["status"] == "quarantined"]
    reasons = Counter(str(r).split(":", 1)[0] for r in quarantined["reason"])
    summary = IngestSummary(total=len(frame), ok=len(frame) - len(quarantined), quarantined=len(quarantined),
                            reasons=dict(reasons))
    atomic_bytes(out / SUMMARY, (summary.model_dump_json(indent=2) + "\n").encode())
    return summary


def read_manifest(path: Path | str, ok_only: bool = True) -> pd.DataFrame:
    """The manifest (only ``ok`` rows unless ``ok_only=False``); ``path`` is a manifest file or its folder."""
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise UltraFluxError(f"manifest {path} does not exist: run `ultraflux data ingest` first")
    frame = pd.read_parquet(path)
    return frame[frame["status"] == "ok"].reset_index(drop=True) if ok_only else frame
