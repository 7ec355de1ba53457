"""Sinks that land tensors in host memory.

- MapSink: no copy. Each file is mapped private and every segment is made resident with
  MADV_POPULATE_READ; tensors are views of the map, cut from one view of the whole map per
  dtype (a warm load of a file of many small tensors spends much of its time making views). On this VM it is also the fastest way to
  read a cold file (the kernel's read-ahead issues the large requests), and it never touches
  fresh anonymous memory (which the VM makes us pay for: ~1.3 s/GiB when first touched).
- DirectSink: one allocation per file, filled by parallel preads straight into it (a copy the
  caller owns outright, independent of the file).
- StagedSink: a ring of host buffers, each segment copied from its slot into the tensors it
  overlaps, each tensor its own allocation: what `iter_tensors(copy=True)` needs so that
  memory stays bounded by the ring plus the tensors the consumer still holds. It runs the
  same ring logic as the CUDA sink, which lets the CPU test suite exercise it.
"""

from __future__ import annotations

import bisect
import mmap
import threading
from collections.abc import Sequence

import numpy as np
import torch

from . import _tensors
from ._format import TensorInfo
from ._io import Populator, Shard, looks_cached
from ._pipeline import Ring
from ._plan import Segment


class MapSink:
    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = shards
        self.maps: list[mmap.mmap] = [s.map() for s in shards]
        self._pop = [Populator(m, s) for m, s in zip(self.maps, shards)]
        self._bufs = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]
        self._typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def buffer(self, file: int) -> torch.Tensor:
        """The whole file as uint8 (views need `base` = data_start)."""
        return self._bufs[file]

    def tensor(self, file: int, info: TensorInfo) -> torch.Tensor:
        """Tensor `info` of `file`, a view of the map: a slice of the whole map viewed as
        its dtype, two torch calls instead of four (what `_tensors.view` does, which still
        handles empty and misaligned tensors)."""
        dt = _tensors.torch_dtype(info)
        start = self.shards[file].header.data_start + info.begin
        if info.nbytes == 0 or start % dt.itemsize:
            return _tensors.view(self._bufs[file], info, base=start - info.begin)
        typed = self._typed.get((file, dt))
        if typed is None:
            whole = self._bufs[file]
            typed = whole[: len(whole) - len(whole) % dt.itemsize].view(dt)
            self._typed[(file, dt)] = typed
        n = dt.itemsize
        return typed[start // n: (start + info.nbytes) // n].view(_tensors.torch_shape(info))

    def cached(self) -> bool:
        """Whether every file seems to be in the page cache already (sampled: a guess that
        only chooses between populating inline and with reader threads)."""
        return all(looks_cached(m, s.size) for m, s in zip(self.maps, self.shards))

    def process(self, seg: Segment) -> None:
        start = self.shards[seg.file].header.data_start + seg.offset
        lo = start - start % mmap.PAGESIZE  # madvise wants a page-aligned start
        # Populate even what is already cached: measured here, leaving cached pages to be
        # mapped by the first touch (mincore first, then skip) was slower in total.
        self._pop[seg.file].populate(lo, start + seg.length - lo)

    def flush(self) -> None:
        pass


class DirectSink:
    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = shards
        self.bufs = [torch.empty(s.header.data_size, dtype=torch.uint8) for s in shards]
        self._views = [memoryview(b.numpy()) for b in self.bufs]

    def buffer(self, file: int) -> torch.Tensor:
        return self.bufs[file]

    def process(self, seg: Segment) -> None:
        mv = self._views[seg.file][seg.offset: seg.offset + seg.length]
        self.shards[seg.file].read_into(mv, seg.offset)

    def flush(self) -> None:
        pass


class StagedSink:
    def __init__(self, shards: Sequence[Shard], ring: Ring) -> None:
        self.shards = shards
        self.ring = ring
        self._begins = [[t.begin for t in s.header.tensors] for s in shards]
        self._dest: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def process(self, seg: Segment) -> None:
        i = self.ring.acquire()
        try:
            slot: np.ndarray = self.ring.buffers[i]
            self.shards[seg.file].read_into(memoryview(slot[: seg.length]), seg.offset)
            tensors = self.shards[seg.file].header.tensors
            k = max(0, bisect.bisect_right(self._begins[seg.file], seg.offset) - 1)
            seg_end = seg.offset + seg.length
            while k < len(tensors) and tensors[k].begin < seg_end:
                t = tensors[k]
                lo, hi = max(t.begin, seg.offset), min(t.end, seg_end)
                if lo < hi:
                    dest = self._destination(seg.file, k, t.nbytes)
                    dest[lo - t.begin: hi - t.begin] = slot[lo - seg.offset: hi - seg.offset]
                k += 1
        finally:
            self.ring.release(i)

    def _destination(self, file: int, k: int, nbytes: int) -> np.ndarray:
        with self._lock:
            d = self._dest.get((file, k))
            if d is None:
                d = self._dest[(file, k)] = _alloc(nbytes)
            return d

    def take(self, file: int, k: int) -> torch.Tensor:
        """Tensor k of `file` as its own uint8 buffer; we forget it (the consumer owns it)."""
        with self._lock:
            d = self._dest.pop((file, k), None)
        return torch.from_numpy(d) if d is not None else torch.empty(0, dtype=torch.uint8)

    def flush(self) -> None:
        pass


def _alloc(nbytes: int) -> np.ndarray:
    """A tensor's own buffer. Large ones are anonymous maps, unmapped the moment the consumer
    drops the tensor: from malloc, reader threads would each grow their own arena and keep
    the freed memory, and the bound this sink promises would hold only on paper."""
    if nbytes < BIG:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


BIG = 1 << 20


class HostRings:
    """Staging rings kept between loads: fresh memory is slow to touch on this VM (and on
    any host, pinned memory is slow to allocate), so a process reuses its rings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[int, int], list[list[np.ndarray]]] = {}

    def get(self, slots: int, size: int) -> list[np.ndarray]:
        with self._lock:
            idle = self._idle.get((slots, size))
            if idle:
                return idle.pop()
        return [np.empty(size, dtype=np.uint8) for _ in range(slots)]

    def put(self, slots: int, size: int, bufs: list[np.ndarray]) -> None:
        with self._lock:
            self._idle.setdefault((slots, size), []).append(bufs)


HOST_RINGS = HostRings()
