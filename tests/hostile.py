"""Hostile files for tests: small on disk, huge on paper (readers must judge them by the
header and never decode them)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, tag, data, CRC."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header(path: Path, width: int, height: int) -> Path:
    """A ~60-byte PNG whose header CLAIMS width x height 8-bit RGB pixels (its data is a
    few bytes): decoding it would allocate 3 x width x height bytes before failing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4))
                     + png_chunk(b"IEND", b""))
    return path
