"""Metadata records: jsonl / parquet / csv, aliases, unknown fields kept, bad rows reported (never raised)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.metadata import SampleRecord, read_metadata

ROWS = [
    {"image_url": "https://example.org/a.jpg", "caption_en": "a fox", "caption_zh": "狐狸", "qalign_score": 4.5,
     "aesthetics_score": 6.1, "flat_percentage": 0.1, "shannon_entropy": 7.4, "width": 4096, "height": 2304,
     "work_url": "https://example.org/w/1", "photographer": "Ann", "photographer_url": "https://example.org/ann",
     "character": "fox, snow", "license": "cc-by"},
    {"url": "https://example.org/b.jpg", "caption": "a boat", "aesthetic_score": 5.0, "WIDTH": 5000, "HEIGHT": 3000},
    {"url": "https://example.org/a.jpg", "caption": "the fox again"},
    {"caption": "no location at all"},
    {"image_url": "https://example.org/c.jpg", "width": "not a number"},
]


def _check(records: list[SampleRecord], report) -> None:
    assert report.rows == 5 and report.valid == 3
    assert {e.row for e in report.invalid} == {4, 5}
    assert "no image_url" in next(e.reason for e in report.invalid if e.row == 4)
    assert "width" in next(e.reason for e in report.invalid if e.row == 5)
    first, second = records[0], records[1]
    assert first.caption_zh == "狐狸" and first.qalign_score == 4.5 and first.extra_fields() == {"license": "cc-by"}
    assert second.image_url == "https://example.org/b.jpg" and second.caption_en == "a boat"
    assert second.aesthetics_score == 5.0 and (second.width, second.height) == (5000, 3000)
    assert report.duplicates == 1 and report.duplicate_examples == ["https://example.org/a.jpg"]
    assert report.missing["caption_zh"] == 2 and report.missing["image_url"] == 0
    assert report.extra_fields == ["license"]


def test_jsonl_with_aliases_unknown_fields_and_bad_rows(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n")
    _check(*read_metadata(path))


def test_jsonl_line_that_is_not_json_is_reported(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    records, report = read_metadata(path)
    assert len(records) == 1 and report.invalid[0].row == 2 and "JSON" in report.invalid[0].reason


def test_parquet_and_csv_give_the_same_records(tmp_path):
    frame = pd.DataFrame(ROWS).astype({"width": "string"})  # parquet needs one type per column
    frame.to_parquet(tmp_path / "m.parquet")
    # csv: every cell is text and empty cells are missing values
    frame.to_csv(tmp_path / "m.csv", index=False)
    for name in ("m.parquet", "m.csv"):
        records, report = read_metadata(tmp_path / name)
        assert report.valid == 3, name
        assert records[0].qalign_score == 4.5 and records[0].width == 4096
        assert records[1].caption_en == "a boat" and records[1].caption_zh is None


def test_missing_or_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(UltraFluxError, match="does not exist"):
        read_metadata(tmp_path / "nope.jsonl")
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(UltraFluxError, match="must end in one of"):
        read_metadata(tmp_path / "m.xml")


def test_summary_mentions_counts(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS))
    text = read_metadata(path)[1].summary()
    assert "5 rows, 3 valid, 2 invalid, 1 duplicate" in text and "row 4" in text
