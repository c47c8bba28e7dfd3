"""MultiAspect-4K metadata: one record type, readers for jsonl / parquet / csv, and a validation report.

Field names follow the released metadata (docs/design.md §3); common aliases from other dumps are accepted
(``url`` → ``image_url``, ``caption``/``text``/``prompt`` → ``caption_en``, …). Unknown fields are kept on the
record (pydantic ``extra="allow"``) so nothing a user supplied is lost on the way to the manifest.
A row that does not validate never aborts the read: it lands in the report with its line number and reason.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from ultraflux_core.errors import UltraFluxError

METADATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_missing(value: Any) -> bool:
    """pandas gives NaN/NA/None for empty cells and csv gives ''; all mean "missing"."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (not isinstance(value, (list, tuple, dict)) and bool(pd.isna(value)))


def _alias(name: str, *others: str) -> Any:
    return Field(None, validation_alias=AliasChoices(name, *others))


class SampleRecord(BaseModel):
    """One sample of the metadata. ``image_url`` may be http(s), ``file://`` or a path; ``file_name`` is the
    path relative to a folder source (the Hugging Face imagefolder convention)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    image_url: str | None = _alias("image_url", "url", "URL", "img_url")
    file_name: str | None = _alias("file_name", "filename", "path", "file")
    caption_en: str | None = _alias("caption_en", "caption", "text", "prompt", "TEXT", "caption_english")
    caption_zh: str | None = _alias("caption_zh", "caption_cn", "caption_chinese")
    character: str | None = _alias("character", "characters", "tags")
    qalign_score: float | None = _alias("qalign_score", "q_align", "qalign", "q_align_score")
    aesthetics_score: float | None = _alias("aesthetics_score", "aesthetic_score", "aesthetic", "aesthetics")
    flat_percentage: float | None = _alias("flat_percentage", "flatness", "flat_pct")
    shannon_entropy: float | None = _alias("shannon_entropy", "entropy")
    width: int | None = _alias("width", "WIDTH", "w")
    height: int | None = _alias("height", "HEIGHT", "h")
    work_url: str | None = _alias("work_url", "page_url", "source_url")
    photographer: str | None = _alias("photographer", "author", "artist")
    photographer_url: str | None = _alias("photographer_url", "author_url", "artist_url")


    @field_validator("character", mode="before")
    @classmethod
    def _tags_to_text(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return value

    @property
    def location(self) -> str | None:
        """Where the image is: ``image_url`` if given, else ``file_name``."""
        return self.image_url or self.file_name

    def extra_fields(self) -> dict[str, Any]:
        """The unknown fields the source carried, kept verbatim."""
        return dict(self.model_extra or {})


class RowError(BaseModel):
    """A metadata row that could not be read as a ``SampleRecord``."""

    row: int
    reason: str


class MetadataReport(BaseModel):
    """Validation summary of one metadata file."""

    path: str
    rows: int
    valid: int
    invalid: list[RowError]
    missing: dict[str, int] = Field(description="per known field: valid rows without a value")
    duplicates: int = Field(description="valid rows whose image location appeared on an earlier row")
    duplicate_examples: list[str]
    extra_fields: list[str]

    def summary(self) -> str:
        lines = [f"{self.path}: {self.rows} rows, {self.valid} valid, {len(self.invalid)} invalid, "
                 f"{self.duplicates} duplicate locations"]
        lines += [f"  missing {name}: {count}" for name, count in self.missing.items() if count]
        lines += [f"  row {e.row}: {e.reason}" for e in self.invalid[:10]]
        if self.extra_fields:
            lines.append(f"  kept unknown fields: {', '.join(self.extra_fields)}")
        return "\n".join(lines)


def _read_rows(path: Path) -> list[Any]:
    """Raw rows (dicts, or the text of a jsonl line that is not a JSON object)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows: list[Any] = []
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError as err:
                raise UltraFluxError(f"{path} is not valid JSON: {err}") from err
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(line)
        return rows
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise UltraFluxError(f"metadata file {path} must end in one of {', '.join(METADATA_SUFFIXES)}")
    return frame.to_dict(orient="records")


def read_metadata(path: Path | str) -> tuple[list[SampleRecord], MetadataReport]:
    """Read a metadata file into records plus a report; bad rows are reported, never raised."""
    path = Path(path)
    if not path.is_file():
        raise UltraFluxError(f"metadata file {path} does not exist")
    raw = _read_rows(path)
    records: list[SampleRecord] = []
    invalid: list[RowError] = []
    for number, row in enumerate(raw, start=1):
        if not isinstance(row, dict):
            invalid.append(RowError(row=number, reason="not a JSON object"))
            continue
        # Drop missing cells first: a table has every column on every row, and an empty `image_url` cell
        # must not hide the `url` alias of the same row.
        row = {str(k): v for k, v in row.items() if not is_missing(v)}
        try:
            record = SampleRecord.model_validate(row)
        except ValidationError as err:
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            invalid.append(RowError(row=number, reason=reason))
            continue
        if record.location is None:
            invalid.append(RowError(row=number, reason="no image_url or file_name"))
            continue
        records.append(record)
    known = [name for name in SampleRecord.model_fields if name != "file_name"]
    missing = {name: sum(getattr(r, name) is None for r in records) for name in known}
    seen: Counter[str] = Counter()
    duplicates: list[str] = []
    for record in records:
        seen[record.location] += 1
        if seen[record.location] == 2:
            duplicates.append(record.location)
    extra = sorted({key for r in records for key in r.extra_fields()})
    report = MetadataReport(
        path=str(path), rows=len(raw), valid=len(records), invalid=invalid, missing=missing,
        duplicates=sum(c - 1 for c in seen.values()), duplicate_examples=duplicates[:10], extra_fields=extra,
    )
    return records, report
