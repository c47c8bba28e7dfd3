"""Where an encoded image ends: the byte just past a JPEG's EOI, a PNG's IEND chunk or a WebP's RIFF size.

Ingest keeps the original bytes of JPEG/PNG/WebP files, so anything appended after the image (a zip, another
file, a gigabyte of junk) would enter the content-addressed store unseen: the decoder stops at the end marker and
never reads it. These walkers follow each format's structure (segment lengths, chunk lengths) through a memory
map, so a large file is scanned without being read into memory.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_end(data: mmap.mmap) -> int | None:
    """Offset past the EOI marker that closes the first image (segments are skipped by their length; entropy-coded
    data after each SOS runs to the next marker that is not a stuffed 0xFF00 or a restart marker)."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            return pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            continue
        if pos + 2 > n:
            return None
        pos += struct.unpack(">H", data[pos : pos + 2])[0]
        if marker != 0xDA:  # not SOS: the segment is all there is
            continue
        while True:  # scan data: up to the next real marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= n:
                return None
            following = data[pos + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                pos += 2
            elif following == 0xFF:
                pos += 1
            else:
                break
    return None


def _png_end(data: mmap.mmap) -> int | None:
    """Offset past the IEND chunk's CRC (chunks: 4-byte length, 4-byte type, data, 4-byte CRC)."""
    n = len(data)
    if data[:8] != _PNG_SIGNATURE:
        return None
    pos = 8
    while pos + 8 <= n:
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        chunk = data[pos + 4 : pos + 8]
        pos += 12 + length
        if chunk == b"IEND":
            return pos if pos <= n else None
    return None


def _webp_end(data: mmap.mmap) -> int | None:
    """``8 + RIFF size`` (padded to even), the whole of a well-formed WebP file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    size = struct.unpack("<I", data[4:8])[0]
    return 8 + size + (size & 1)


_WALKERS = {"JPEG": _jpeg_end, "PNG": _png_end, "WEBP": _webp_end}


def encoded_end(path: Path | str, fmt: str) -> int | None:
    """Length of the image proper at the start of ``path`` (PIL format name ``fmt``: JPEG, PNG or WEBP); ``None``
    when its structure cannot be followed to the end (the file is cut short or malformed)."""
    walker = _WALKERS[fmt]
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return walker(data)
