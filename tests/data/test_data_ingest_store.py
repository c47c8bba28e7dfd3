"""The ingest store is immutable and bounded (issue 19): stored files share no inode with the user's, inputs over
the byte cap are refused from their size, and bytes after an image's end never enter the store."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from ultraflux_data.config import DataConfig
from ultraflux_data.image_end import encoded_end
from ultraflux_data.ingest import ingest, read_manifest


def _image(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rows(src, out, **ingest_cfg):
    ingest(src, out, DataConfig.model_validate({"ingest": ingest_cfg}), progress=False)
    return {row["source"]: row for _, row in read_manifest(out, ok_only=False).iterrows()}


def test_editing_a_source_in_place_after_ingest_leaves_the_store_unchanged(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    original = _encode(_image(0), "JPEG", quality=90)
    (src / "a.jpg").write_bytes(original)
    row = _rows(src, tmp_path / "out")["a.jpg"]
    stored = tmp_path / "out" / row["path"]
    assert row["status"] == "ok" and row["stored"] == "copy"
    assert os.stat(stored).st_ino != os.stat(src / "a.jpg").st_ino
    with open(src / "a.jpg", "r+b") as fh:  # the attack: overwrite the user's file in place (same inode)
        fh.seek(200)
        fh.write(b"\x00" * 64)
    assert stored.read_bytes() == original
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["key"]


def test_a_jpeg_followed_by_a_gigabyte_is_refused_from_its_size_without_reading_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.jpg", "wb") as fh:
        fh.write(_encode(_image(1), "JPEG"))
        fh.truncate(2**30 + 1234)  # 1 GiB of (sparse) junk after the JPEG
    tracemalloc.start()
    try:
        row = _rows(src, tmp_path / "out")["big.jpg"]  # default max_bytes: 512 MiB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert row["status"] == "quarantined" and row["reason"].startswith("too large: 1073743058 bytes > max_bytes=")
    assert peak < 2**27  # never held in memory (the old path read the whole file)
    assert not list((tmp_path / "out").rglob("*.jpg"))


def test_byte_cap_is_a_setting(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(_encode(_image(2), "PNG"))
    assert _rows(src, tmp_path / "out", max_bytes=1000)["a.png"]["reason"].startswith("too large")
    assert _rows(src, tmp_path / "out2")["a.png"]["status"] == "ok"


@pytest.mark.parametrize(
    "fmt, ext, kw", [("JPEG", "jpg", {"quality": 90}), ("PNG", "png", {}), ("WEBP", "webp", {"quality": 80})]
)
def test_trailing_data_after_the_image_is_quarantined_or_stripped(tmp_path, fmt, ext, kw):
    src = tmp_path / "src"
    src.mkdir()
    clean = _encode(_image(3), fmt, **kw)
    (src / f"a.{ext}").write_bytes(clean + b"PK\x03\x04 a hidden archive " * 400)
    row = _rows(src, tmp_path / "out")[f"a.{ext}"]
    assert row["status"] == "quarantined"
    assert row["reason"] == f"trailing data: {22 * 400} bytes after the end of the {fmt} image"
    row = _rows(src, tmp_path / "strip", trailing_data="strip")[f"a.{ext}"]
    assert row["status"] == "ok" and row["normalised"] == "trailing_data_stripped"
    assert (tmp_path / "strip" / row["path"]).read_bytes() == clean
    assert row["key"] == hashlib.sha256(clean).hexdigest()


@pytest.mark.parametrize(
    "kw",
    [
        {"quality": 90},
        {"quality": 75, "progressive": True},
        {"quality": 95, "optimize": True, "subsampling": 0},
        {"quality": 85, "restart_marker_blocks": 1},  # RSTn markers inside the scan data
        {"quality": 85, "exif": b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\x00\x00" + b"\xff\xd9" * 8},  # EOI in APP1
    ],
)
def test_well_formed_jpegs_end_exactly_at_their_last_byte(tmp_path, kw):
    path = tmp_path / "a.jpg"
    path.write_bytes(_encode(_image(4, (160, 120)), "JPEG", **kw))
    assert encoded_end(path, "JPEG") == path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\xff\xd9junk")
    assert encoded_end(path, "JPEG") == path.stat().st_size - 6


def test_a_cut_jpeg_has_no_end(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_encode(_image(5), "JPEG")[:-300])
    assert encoded_end(path, "JPEG") is None
