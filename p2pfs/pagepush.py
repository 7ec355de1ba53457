"""Verified layer bytes pushed into the kernel's page cache of EROFS blobs (FUSE notify_store).

With layers mounted as EROFS, the only FUSE requests a container start sends are reads of
the layers' blobs, one per page-cache miss, each a round trip through this daemon. But the
daemon often knows the bytes before the kernel asks: the pack read-ahead fetches the
neighbours of what was just read, and a recorded start-up list is prefetched from the layer's
first touch. This service stores those bytes straight into the blob file's page cache (the kernel's
FUSE_NOTIFY_STORE), so EROFS finds them there and sends no request at all.

- Only verified bytes: what is pushed comes from the chunk store (`get`), as a read's reply
  would; a chunk is pushed only at the blob offsets the layer's image gives it, whole pages
  only (the tail page of a file padded with the zeros the blob holds there), never past the
  blob's end.
- Never on the FUSE thread: the kernel may have to wait for a page another read holds
  locked, and that read's reply comes from the FUSE thread; so each store runs in a worker
  thread (pyfuse3 releases the GIL) while the FUSE thread keeps serving.
- Bounded: offers wait in a queue of at most `max_pending` bytes, and one that does not fit
  is dropped (counted): the reader then sends the FUSE read it would have sent anyway.
  A failed store (the kernel forgot the inode, an old kernel) is counted and ignored.
- Early offers wait for the open: a start-up list is prefetched from the first lookup of
  the layer's EROFS files, while its image is still being built, so some of it lands before
  the kernel has the blob open. Those chunks are parked (their locations only, at most
  `max_pending` bytes' worth) and offered when it opens (`opened`), fetched again through
  the store, whose memory tier the prefetch left them in. A layer whose image could not be
  built parks nothing (it is never mounted as EROFS), and one not opened within
  `PARK_TTL` seconds (a mount that failed) gives its share of the bound back.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Sequence

import trio

from .errors import P2PFSError
from .plan import ChunkLoc

if TYPE_CHECKING:
    from .store import ChunkStore
    from .tree import LayerImage

log = logging.getLogger("p2pfs.pagepush")


def _notify_store(inode: int, offset: int, data) -> None:
    import pyfuse3

    pyfuse3.notify_store(inode, offset, data)


class PagePusher:
    PARK_TTL = 60.0  # the snapshotter mounts within 10 s of its lookup, or not at all

    def __init__(self, store: "ChunkStore", *, max_pending: int = 128 << 20,
                 max_run: int = 1 << 20,
                 notify: Callable[[int, int, object], None] = _notify_store) -> None:
        self.store = store
        self.max_pending = max_pending
        self.max_run = max_run
        self._notify = notify
        self._queue: deque[tuple["LayerImage", list[ChunkLoc], Sequence | None, int]] = deque()
        self._pending = 0
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        #: id(layer) -> (layer, parked locations, when they stop counting: monotonic s)
        self._parked: dict[int, tuple["LayerImage", list[ChunkLoc], float]] = {}
        self._parked_bytes = 0
        self.stats = {"pushed_bytes": 0, "pushes": 0, "dropped": 0, "errors": 0}

    def offer(self, layer: "LayerImage", locs: Sequence[ChunkLoc], chunks: Sequence | None = None) -> None:
        """Push these chunks of `layer` once their bytes are here (`chunks`, or fetched
        through the store), or once the kernel has its blob open; never blocks."""
        if layer.direct or not locs or layer.error:
            return  # read past its page cache, or never mounted: nothing would find the pages
        if not layer.opened or layer.blob_inode is None or layer.image is None:
            self._park(layer, locs)
            return
        locs = [loc for loc in locs if loc.digest in layer.positions()]
        if not locs:
            return
        size = sum(loc.ref.size for loc in locs)
        if self._pending + size > self.max_pending:
            self.stats["dropped"] += len(locs)
            return
        self._pending += size
        self._queue.append((layer, locs, chunks, size))
        self._wake.set()

    def _park(self, layer: "LayerImage", locs: Sequence[ChunkLoc]) -> None:
        now = time.monotonic()
        for key in [k for k, (_, _, until) in self._parked.items() if until < now]:
            self._unpark(key)
        size = sum(loc.ref.size for loc in locs)
        if self._parked_bytes + size > self.max_pending:
            self.stats["dropped"] += len(locs)
            return
        self._parked_bytes += size
        self._parked.setdefault(id(layer), (layer, [], now + self.PARK_TTL))[1].extend(locs)

    def _unpark(self, key: int) -> list[ChunkLoc]:
        _, locs, _ = self._parked.pop(key, (None, [], 0.0))
        self._parked_bytes -= sum(loc.ref.size for loc in locs)
        return locs

    def opened(self, layer: "LayerImage") -> None:
        """The kernel opened `layer`'s blob: what was offered before is offered now, in
        steps of at most 16 runs' worth (a queue of `max_pending` bytes takes them)."""
        step: list[ChunkLoc] = []
        filled = 0
        for loc in self._unpark(id(layer)):
            if step and filled + loc.ref.size > 16 * self.max_run:
                self.offer(layer, step)
                step, filled = [], 0
            step.append(loc)
            filled += loc.ref.size
        self.offer(layer, step)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            layer, locs, chunks, size = self._queue.popleft()
            try:
                await self._push(layer, locs, chunks)
            finally:
                self._pending -= size

    async def _push(self, layer: "LayerImage", locs: list[ChunkLoc], chunks: Sequence | None) -> None:
        if chunks is None:
            try:  # `used` 0: nothing is served to a reader by this
                chunks = await self.store.get(locs, used=[0] * len(locs))
            except P2PFSError:
                return  # a reader that needs them fetches (and reports) them itself
        inode = layer.blob_inode
        assert inode is not None
        runs = _runs(layer.positions(), locs, chunks, self.max_run)
        try:
            stored = await trio.to_thread.run_sync(self._store_runs, inode, runs,
                                                   limiter=self._limiter)
        except OSError as exc:
            self.stats["errors"] += 1
            if self.stats["errors"] == 1:
                log.warning("page cache push failed (%s); EROFS blob reads go through FUSE "
                            "requests", exc)
            return
        self.stats["pushes"] += len(runs)
        self.stats["pushed_bytes"] += stored

    def _store_runs(self, inode: int, runs: list[tuple[int, bytes | bytearray]]) -> int:
        """In a worker thread: one store per run (the kernel copies it into the pages)."""
        total = 0
        for offset, data in runs:
            self._notify(inode, offset, data)
            total += len(data)
        return total


def _runs(positions: dict[str, list[tuple[int, int]]], locs: Sequence[ChunkLoc],
          chunks: Sequence, max_run: int) -> list[tuple[int, bytes | bytearray]]:
    """The chunks' blob pages as (offset, bytes) runs: pieces that meet end to end (a
    layer's files sit back to back in the blob, in pack order) are joined, up to `max_run`
    bytes a run, so a batch costs a few stores rather than one per chunk."""
    by_offset = {off: (pad, data) for loc, data in zip(locs, chunks)
                 for off, pad in positions.get(loc.digest, ())}  # a chunk offered twice: once
    runs: list[tuple[int, bytes | bytearray]] = []
    start, buf = 0, bytearray()
    for off in sorted(by_offset):
        pad, data = by_offset[off]
        if not (buf and off == start + len(buf) and len(buf) + len(data) + pad <= max_run):
            if buf:
                runs.append((start, buf))
            start, buf = off, bytearray()
        buf += data
        if pad:
            buf += bytes(pad)
    if buf:
        runs.append((start, buf))
    return runs
