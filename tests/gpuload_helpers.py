"""Shared helpers for the gpuload tests: write safetensors files byte by byte, so tests can
make layouts (odd alignments, lies, sparse multi-GB files) that no library writer produces."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

# dtype -> bits per element (the format's full list, mirrored on purpose rather than imported)
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * BITS[dtype] // 8


def header_bytes(entries: dict[str, Any], *, pad_to: int = 8) -> bytes:
    h = json.dumps(entries, separators=(",", ":")).encode()
    if pad_to > 1:
        h += b" " * ((-(8 + len(h))) % pad_to)
    return h


def write(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], *, seed: int = 0,
          gap_before_first: int = 0, pad_to: int = 8, metadata: dict[str, str] | None = None,
          data: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Write tensors contiguously in the given order with random contents (or `data`);
    `pad_to=1` leaves the header unpadded so every tensor is misaligned in the file.
    Returns {name: raw bytes}."""
    rng = np.random.default_rng(seed)
    entries: dict[str, Any] = {}
    raw: dict[str, bytes] = {}
    off = 0
    for name, dtype, shape in tensors:
        n = nbytes(dtype, shape)
        raw[name] = (data or {}).get(name) or rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if dtype == "BOOL":
            raw[name] = bytes(b & 1 for b in raw[name])
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata is not None:
        entries["__metadata__"] = metadata
    h = header_bytes(entries, pad_to=pad_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, _, _ in tensors:
            f.write(raw[name])
    return raw


def raw_file(path: Path, header: bytes | str, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file from a literal header (and a literal or lying length prefix)."""
    h = header.encode() if isinstance(header, str) else header
    n = len(h) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path
