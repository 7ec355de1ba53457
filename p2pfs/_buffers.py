"""Page-aligned buffers: what O_DIRECT reads and writes need, shared by the origin client
(receive buffers) and the disk cache (chunk files)."""

from __future__ import annotations

import numpy as np

ALIGN = 4096


def aligned_empty(length: int) -> memoryview:
    """An uninitialized, page-aligned buffer. Uninitialized on purpose: on VMs that hand
    freed memory back to the host, zero-filling costs about as much as the data itself."""
    raw = np.empty(length + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return memoryview(raw[start:start + length])


def is_aligned(buf: bytes | bytearray | memoryview) -> bool:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data % ALIGN == 0
