"""A fast, deterministic PNG writer for generated RGB images.

Pillow's PNG encoder picks a filter per row adaptively, which costs about 3 ms for a 224×224 image here and would
cap world generation below 500 images/s on 2 cores. Generated images are smooth, so one fixed filter (Sub) for
every row compresses about as well at half the cost. Any PNG reader (Pillow included) reads the files.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB_FILTER = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """Encode an [H, W, 3] uint8 array as an 8-bit RGB PNG, with the Sub filter on every row."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png expects an [H, W, 3] uint8 array, got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _SUB_FILTER
    filtered[:, 1:4] = rows[:, :3]
    # Sub: each byte minus the byte one pixel to its left, modulo 256 (uint8 arithmetic wraps).
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(rgb))
