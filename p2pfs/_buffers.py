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


class BufferPool:
    """Page-aligned staging buffers handed out again once given back, for short-lived
    copies (a compressed run, from its receive until it is inflated). A fresh buffer
    costs a page fault per page on first touch (with transparent huge pages, zeroing 2 MiB
    at a time), and freeing it returns the pages: measured on a cold image start, those
    faults were a sixth of the daemon's CPU. Sizes are rounded up to a power of two (at
    least `MIN`); at most `keep` bytes wait here; a request over `largest` is not pooled.
    Not thread-safe: take and give from one thread (the daemon's trio thread)."""

    MIN = 64 << 10

    def __init__(self, keep: int, largest: int) -> None:
        self.keep = keep
        self.largest = largest
        self.kept = 0
        self._free: dict[int, list[memoryview]] = {}

    @classmethod
    def size_class(cls, length: int) -> int:
        return max(cls.MIN, 1 << max(0, length - 1).bit_length())

    def take(self, length: int) -> tuple[memoryview, memoryview]:
        """(buffer, its first `length` bytes): give the buffer back when done with both."""
        size = self.size_class(length)
        if size > self.largest:
            buf = aligned_empty(length)
            return buf, buf
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self.kept -= size
        else:
            buf = aligned_empty(size)
        return buf, buf[:length]

    def give(self, buf: memoryview) -> None:
        size = len(buf)
        if size == self.size_class(size) and size <= self.largest and self.kept + size <= self.keep:
            self._free.setdefault(size, []).append(buf)
            self.kept += size
