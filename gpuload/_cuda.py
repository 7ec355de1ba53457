"""The CUDA sink: pinned staging ring, one copy stream, an event per slot.

    reader thread:  acquire slot (waits on the slot's event: its previous H2D copy is done)
                    -> pread into the pinned slot
                    -> on the copy stream: device_buf[file][offset:offset+n].copy_(slot)
                       (non_blocking: pinned memory makes it a true async DMA)
                    -> record the slot's event on the copy stream -> release the slot

so with N readers and K >= N slots, disk/network reads of the next segments overlap the DMA
of the previous ones, and host memory is K x slot size however large the model is. Each file
lands in ONE device allocation; tensors are views into it (fewer cudaMalloc calls, and the
caching allocator sees one block per shard instead of hundreds).

Ordering for consumers: `ready()` makes the caller's current stream wait for the copy stream
(GPU-side, the CPU does not block), so kernels launched after it see the bytes.

UNVERIFIED: this module has not run on a GPU in this repository's CI (no GPU there); its
tests skip with "no CUDA device".
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ._io import Shard
from ._pipeline import Ring
from ._plan import Segment


class CudaSink:
    def __init__(self, shards: Sequence[Shard], device: torch.device, ring: "PinnedRing") -> None:
        self.shards = shards
        self.device = device
        self.pinned = ring
        self.stream = torch.cuda.Stream(device=device)
        # Allocated on the caller's stream; copies run on ours and `flush`/`ready` order them.
        self.bufs = [torch.empty(s.header.data_size, dtype=torch.uint8, device=device)
                     for s in shards]
        self.ring = Ring(ring.slots, wait=lambda i: ring.events[i].synchronize())

    def buffer(self, file: int) -> torch.Tensor:
        return self.bufs[file]

    def process(self, seg: Segment) -> None:
        i = self.ring.acquire()
        try:
            slot = self.pinned.slots[i]
            self.shards[seg.file].read_into(self.pinned.views[i][: seg.length], seg.offset)
            with torch.cuda.stream(self.stream):
                dst = self.bufs[seg.file][seg.offset: seg.offset + seg.length]
                dst.copy_(slot[: seg.length], non_blocking=True)
                self.pinned.events[i].record(self.stream)
        finally:
            self.ring.release(i)

    def ready(self) -> None:
        """Order the caller's current stream after every copy issued so far."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def flush(self) -> None:
        self.stream.synchronize()
        self.ready()


class PinnedRing:
    def __init__(self, device: torch.device, slots: int, size: int) -> None:
        self.key = (device.index, slots, size)  # events belong to one device
        self.slots = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.views = [memoryview(s.numpy()) for s in self.slots]
        self.events = [torch.cuda.Event() for _ in range(slots)]


class PinnedRings:
    """Pinned rings are expensive to make (cudaHostAlloc, and fresh memory): keep them for
    the next load in this process. One ring serves one load at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[int | None, int, int], list[PinnedRing]] = {}

    def get(self, device: torch.device, slots: int, size: int) -> PinnedRing:
        with self._lock:
            idle = self._idle.get((device.index, slots, size))
            if idle:
                return idle.pop()
        return PinnedRing(device, slots, size)

    def put(self, ring: PinnedRing) -> None:
        for e in ring.events:
            e.synchronize()
        with self._lock:
            self._idle.setdefault(ring.key, []).append(ring)


PINNED_RINGS = PinnedRings()
