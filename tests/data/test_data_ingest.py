"""Ingest with quarantine: every bad-input kind ends as a manifest row with a reason, odd images are normalised."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.config import DataConfig, IngestConfig
from ultraflux_data.ingest import ingest, normalise_image, read_manifest


def _textured(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` but carries (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def messy_folder(tmp_path):
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    rgb = Image.fromarray(_textured(64, 48, 0))
    files: dict[str, bytes] = {
        "ok.png": _save(rgb, "PNG"),
        "ok.jpg": _save(Image.fromarray(_textured(64, 48, 1)), "JPEG", quality=90),
        "sub/nested.png": _save(Image.fromarray(_textured(48, 64, 2)), "PNG"),
        "zz_duplicate.png": _save(rgb, "PNG"),
        "truncated.jpg": _save(Image.fromarray(_textured(64, 48, 3)), "JPEG")[:400],  # cut in the header
        "truncated_late.png": _save(Image.fromarray(_textured(64, 48, 9)), "PNG")[:5000],  # cut in the pixels
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(4).integers(0, 256, 300, dtype=np.uint8)),
        "bomb_over_pil.png": _png_header_only(20000, 20000),  # PIL itself raises (> 2x its limit)
        "bomb_pil_warns.png": _png_header_only(9500, 9500),  # PIL would only warn (just over its limit)
        "bomb_over_config.png": _save(Image.fromarray(_textured(120, 100, 5)), "PNG"),  # over max_pixels below
        "cmyk.jpg": _save(Image.fromarray(_textured(64, 48, 6)).convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _save(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21), "PNG"),
        "palette.png": _save(Image.fromarray(_textured(64, 48, 7)).quantize(16), "PNG"),
        "float.tif": _save(Image.fromarray(np.ones((48, 64), np.float32)), "TIFF"),
        "tiny.png": _save(Image.fromarray(_textured(8, 8, 8)), "PNG"),
        "strip.png": _save(Image.fromarray(_textured(64, 8, 10)), "PNG"),  # long side fine, short side tiny
        "notes.txt": b"hello, not an image\n",
        "empty.jpg": b"",
        ".DS_Store": b"\0\0\0\1Bud1",  # hidden files are not inputs
    }
    # alpha: left half fully transparent red, right half opaque blue
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 0)
    rgba[:, 32:] = (0, 0, 255, 255)
    files["alpha.png"] = _save(Image.fromarray(rgba), "PNG")
    # palette with a transparent index
    pal = Image.new("P", (64, 48), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    files["palette_transparent.png"] = _save(pal, "PNG", transparency=0)
    # EXIF orientation 6: stored sideways (48 wide, 64 tall), displayed 64 wide, 48 tall with red on the left
    upright = np.zeros((48, 64, 3), np.uint8)
    upright[:, :32] = (255, 0, 0)
    upright[:, 32:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["exif_rotated.jpg"] = _save(stored, "JPEG", quality=95, exif=exif)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "ok.png", "caption_en": "random noise", "aesthetics_score": 5.5, "rating": "A"}) + "\n"
    )
    return folder


EXPECTED = {
    "ok.png": ("ok", ""), "ok.jpg": ("ok", ""), "sub/nested.png": ("ok", ""),
    "zz_duplicate.png": ("quarantined", "duplicate"),
    "truncated.jpg": ("quarantined", "corrupt"), "truncated_late.png": ("quarantined", "corrupt"),
    "bomb_over_pil.png": ("quarantined", "decompression bomb"),
    "bomb_pil_warns.png": ("quarantined", "decompression bomb"),
    "bomb_over_config.png": ("quarantined", "decompression bomb"),
    "cmyk.jpg": ("ok", "CMYK_to_rgb"), "gray16.png": ("ok", "I;16_to_rgb"), "palette.png": ("ok", "P_to_rgb"),
    "alpha.png": ("ok", "alpha_over_white"), "palette_transparent.png": ("ok", "alpha_over_white"),
    "exif_rotated.jpg": ("ok", "exif_transpose"),
    "float.tif": ("quarantined", "unsupported pixel mode: F"),
    "tiny.png": ("quarantined", "tiny"), "strip.png": ("quarantined", "tiny"),
    "notes.txt": ("quarantined", "not an image"),
    "empty.jpg": ("quarantined", "not an image"),
    "garbage.png": ("quarantined", "not an image"),  # PNG signature, then noise: no PIL plugin accepts it
}


def test_quarantine_matrix(messy_folder, tmp_path):
    cfg = DataConfig(ingest=IngestConfig(max_pixels=10_000, min_side=16))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing (PIL's bomb warning included) may leak out
        summary = ingest(messy_folder, out, cfg, progress=False)
    manifest = read_manifest(out, ok_only=False)
    rows = {row["source"]: row for _, row in manifest.iterrows()}
    assert set(rows) == set(EXPECTED) and len(rows) == len(EXPECTED)  # one row per input, hidden files skipped
    for source, (status, detail) in EXPECTED.items():
        row = rows[source]
        assert row["status"] == status, (source, row["reason"])
        text = row["reason"] if status == "quarantined" else row["normalised"]
        assert text.startswith(detail) if status == "quarantined" else text == detail, (source, text)
    n_ok = sum(status == "ok" for status, _ in EXPECTED.values())
    assert summary.total == len(rows) and summary.ok == n_ok == 9 and summary.quarantined == len(rows) - n_ok
    assert summary.reasons["decompression bomb"] == 3
    assert json.loads((out / "summary.json").read_text())["ok"] == n_ok

    # stored files: RGB, named by content hash; untouched files keep their bytes
    for row in rows.values():
        if row["status"] != "ok":
            assert row["path"] is None or row["path"] != row["path"]
            continue
        stored = out / row["path"]
        assert stored.name.startswith(row["key"])
        with Image.open(stored) as image:
            assert image.mode == "RGB" and image.size == (row["width"], row["height"])
    assert (out / rows["ok.png"]["path"]).read_bytes() == (messy_folder / "ok.png").read_bytes()
    assert rows["ok.png"]["caption_en"] == "random noise" and rows["ok.png"]["aesthetics_score"] == 5.5
    assert json.loads(rows["ok.png"]["extra"]) == {"rating": "A"}
    assert rows["zz_duplicate.png"]["reason"] == "duplicate: same content as ok.png"

    def pixels(source: str) -> np.ndarray:
        return np.asarray(Image.open(out / rows[source]["path"]))

    alpha = pixels("alpha.png")
    assert (alpha[:, :32] == 255).all() and (alpha[:, 32:] == (0, 0, 255)).all()
    assert (pixels("palette_transparent.png") == 255).all()
    rotated = pixels("exif_rotated.jpg")
    assert rotated.shape == (48, 64, 3)
    assert rotated[:, :28, 0].mean() > 200 and rotated[:, 36:, 2].mean() > 200  # red left, blue right
    gray = pixels("gray16.png")
    source16 = np.asarray(Image.open(messy_folder / "gray16.png"), dtype=np.uint16)
    assert (gray[..., 0] == (source16 >> 8)).all() and (gray[..., 0] == gray[..., 2]).all()
    cmyk = pixels("cmyk.jpg").astype(int)
    reference = np.asarray(Image.open(messy_folder / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(cmyk - reference).max() == 0


def test_rerun_is_identical(messy_folder, tmp_path):
    cfg = DataConfig(ingest=IngestConfig(max_pixels=10_000, min_side=16))
    ingest(messy_folder, tmp_path / "a", cfg, progress=False)
    ingest(messy_folder, tmp_path / "b", cfg, progress=False)
    a, b = (read_manifest(tmp_path / d, ok_only=False) for d in "ab")
    assert a.equals(b)


def test_normalise_image_raises_quarantine_not_crashes(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_png_header_only(20000, 20000))
    from ultraflux_data.ingest import Quarantine

    with pytest.raises(Quarantine, match="decompression bomb"):
        normalise_image(path, IngestConfig())


def test_pixel_limit_cannot_exceed_pil_limit():
    with pytest.raises(ValueError):
        IngestConfig(max_pixels=200_000_000)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(UltraFluxError, match="neither a folder nor a metadata file"):
        ingest(tmp_path / "nope", tmp_path / "out", progress=False)


def test_cli_ingest_and_validate(messy_folder, tmp_path):
    from typer.testing import CliRunner
    from ultraflux.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "ingest", "--source", str(messy_folder), "--out", str(tmp_path / "o"),
                                 "--set", "data.ingest.max_pixels=10000", "--set", "data.ingest.min_side=16"])
    assert result.exit_code == 0, result.output
    assert f"ingested {len(EXPECTED)}: 9 ok, {len(EXPECTED) - 9} quarantined" in result.output
    assert (tmp_path / "o" / "manifest.parquet").is_file()
    result = runner.invoke(app, ["data", "validate", str(messy_folder / "metadata.jsonl")])
    assert result.exit_code == 0 and "1 rows, 1 valid, 0 invalid" in result.output


def test_output_folder_inside_the_source_is_not_ingested(messy_folder):
    cfg = DataConfig(ingest=IngestConfig(max_pixels=10_000, min_side=16))
    first = ingest(messy_folder, messy_folder / "ingested", cfg, progress=False)
    second = ingest(messy_folder, messy_folder / "ingested", cfg, progress=False)
    assert first == second and first.total == len(EXPECTED)


def test_caption_files_beside_images(tmp_path):
    """A `<stem>.txt` beside an image is its caption (not an input); a metadata file's caption wins; a .txt with no
    image beside it stays an input (quarantined as before)."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png", "c.png"]):
        Image.fromarray(_textured(48, 40, i)).save(folder / name)
    (folder / "a.txt").write_text("a red fox  \n")
    (folder / "sub" / "b.txt").write_text("a lighthouse at dusk")
    (folder / "notes.txt").write_text("not a caption")
    result = ingest(folder, tmp_path / "out", DataConfig(ingest=IngestConfig(min_side=16)), progress=False)
    rows = read_manifest(tmp_path / "out", ok_only=False).set_index("source")
    assert set(rows.index) == {"a.png", "sub/b.png", "c.png", "notes.txt"} and result.total == 4
    assert rows.loc["a.png", "caption_en"] == "a red fox"
    assert rows.loc["sub/b.png", "caption_en"] == "a lighthouse at dusk"
    assert rows.loc["c.png", "caption_en"] is None or rows.loc["c.png", "caption_en"] != rows.loc["c.png", "caption_en"]
    assert rows.loc["notes.txt", "status"] == "quarantined"
