"""The daemon's side of a `fill` session: file bytes written into a client's memory.

The client's first line names a file and carries a sealed memfd (checked and mapped by
`_fds.map_fill_memory`, its descriptor closed off the trio thread at once: the mapping is
all we keep). Then each `{"id", "offset", "length", "at"}` line is served concurrently, at
most `fill_inflight` at once, and answered in completion order. Whole chunks go through
`ChunkStore.fill` (received or read straight into the client's memory); the partial chunks
at either end are copied from `ChunkStore.get`. Cancellation rules: docs/ARCHITECTURE.md
("Fill path").
"""

from __future__ import annotations

import logging
import math
import mmap
from typing import TYPE_CHECKING, Any

import trio

from ..errors import P2PFSError, ProtocolError
from ..plan import chunk_span
from ..tree import Node
from . import _wire
from ._fds import map_fill_memory

if TYPE_CHECKING:
    from ..store import ChunkStore
    from ._server import Connection

log = logging.getLogger("p2pfs.control")


async def serve_fill(conn: "Connection", store: "ChunkStore", path: str, node: Node, fd: int,
                     limits: _wire.ControlLimits) -> None:
    """Serve a fill session of `path` (`node`) into the memory behind `fd` (ours to close)."""
    entry = node.entry
    assert entry is not None
    try:
        memory = await trio.to_thread.run_sync(map_fill_memory, fd)
    finally:
        conn.closer.close_soon([fd])
    view = memoryview(memory)
    try:
        await conn.send({"ok": True, "size": entry.size,
                         "chunk_size": entry.chunks[0].size if entry.chunks else 0})
        await _Session(conn, store, path, node, view, limits).run()
    finally:
        _unmap(memory, view)


def _unmap(memory: mmap.mmap, view: memoryview) -> None:
    try:
        view.release()
        memory.close()
    except BufferError:
        pass  # a view is still referenced somewhere; the map goes with it


class _Session:
    def __init__(self, conn: "Connection", store: "ChunkStore", path: str, node: Node,
                 view: memoryview, limits: _wire.ControlLimits) -> None:
        self.conn, self.store, self.path, self.node, self.view = conn, store, path, node, view
        self.limits = limits
        self.send, self.recv = trio.open_memory_channel[dict[str, Any]](limits.fill_inflight)
        self.slots = trio.Semaphore(limits.fill_inflight)
        self.in_flight = 0
        self.reading = trio.CancelScope()   # the request loop; cancelled once the client is gone
        self.idle = trio.CancelScope()      # its deadline: fill_idle_timeout with nothing in flight

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender)
            async with self.send:
                # Until the client hangs up; fills under way then still finish (bounded by
                # the read timeout), so no flight another reader waits on is cut. Their
                # deferred disk writes run in this nursery too: the memory stays mapped
                # until the last one is done.
                async with trio.open_nursery() as fills:
                    with self.reading:
                        await self._read_requests(fills)

    async def _read_requests(self, fills: trio.Nursery) -> None:
        entry = self.node.entry
        assert entry is not None
        while True:
            self._arm_idle()
            try:
                with self.idle:
                    line = await self.conn.next_line()
            except ProtocolError as exc:  # a line too long: answer, stop reading
                await self.send.send(_wire.error(str(exc), _wire.BAD_REQUEST))
                return
            if self.idle.cancelled_caught:
                await self.send.send(_wire.error(
                    f"fill session idle for {self.limits.fill_idle_timeout:g} s: closed "
                    f"(open a new one)", _wire.TIMEOUT))
                return
            self.idle = trio.CancelScope()
            if line is None:
                return
            if self.conn.fds_dropped:  # descriptors with a later line: refused, session over
                await self.send.send(_wire.error(str(_wire.late_fds_error()), _wire.BAD_REQUEST))
                return
            try:
                r = _wire.parse_request(line)
            except ProtocolError as exc:  # garbage: answer, stop reading
                await self.send.send(_wire.error(str(exc), _wire.BAD_REQUEST))
                return
            try:
                req = _wire.parse_fill(r, entry.size, len(self.view))
            except ProtocolError as exc:
                await self.send.send(_wire.error(str(exc), _wire.BAD_REQUEST, id=r.get("id")))
                continue
            await self.slots.acquire()
            self.in_flight += 1
            fills.start_soon(self._one, fills, req)

    def _arm_idle(self) -> None:
        self.idle.deadline = (math.inf if self.in_flight else
                              trio.current_time() + self.limits.fill_idle_timeout)

    async def _sender(self) -> None:
        gone = False
        async with self.recv:
            async for msg in self.recv:
                if gone:
                    continue  # keep draining: the fills still finish
                try:
                    await self.conn.send(msg)
                except trio.BrokenResourceError:
                    gone = True
                    self.reading.cancel()

    async def _one(self, writes: trio.Nursery, req: _wire.FillRequest) -> None:
        metrics = self.store.metrics
        try:
            await self._fill_range(self.view[req.at:req.at + req.length], req.offset, writes)
            reply: dict[str, Any] = {"id": req.id, "ok": True}
            metrics.fill_bytes += req.length
        except P2PFSError as exc:
            reply = _wire.error(str(exc), _wire.FAILED, id=req.id)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: log it, answer, go on
            log.exception("fill of %s failed", self.path)
            reply = _wire.error(f"internal error: {exc!r}", _wire.INTERNAL, id=req.id)
        metrics.fill_requests += 1
        try:
            await self.send.send(reply)
        finally:
            # Only now: a client that sends without reading replies stalls itself,
            # instead of piling up finished requests here.
            self.slots.release()
            self.in_flight -= 1
            if not self.in_flight:
                self._arm_idle()

    async def _fill_range(self, dest: memoryview, offset: int, writes: trio.Nursery) -> None:
        """File bytes [offset, offset + len(dest)) into `dest`: whole chunks through the
        store's zero-copy fill, the partial chunks at either end copied from `get`."""
        node, entry = self.node, self.node.entry
        assert entry is not None
        end = offset + len(dest)
        span = chunk_span(entry, offset, len(dest))
        full = [i for i in span
                if entry.starts[i] >= offset and entry.starts[i] + entry.chunks[i].size <= end]
        for i in span:
            if full and full[0] <= i <= full[-1]:
                continue
            c0 = entry.starts[i]
            (data,) = await self.store.get(node.locs(range(i, i + 1)))
            lo, hi = max(offset, c0), min(end, c0 + entry.chunks[i].size)
            part = dest[lo - offset:hi - offset]
            await trio.to_thread.run_sync(part.__setitem__, slice(None),
                                          memoryview(data)[lo - c0:hi - c0])
        if full:
            lo = entry.starts[full[0]] - offset
            hi = entry.starts[full[-1]] + entry.chunks[full[-1]].size - offset
            await self.store.fill(node.locs(range(full[0], full[-1] + 1)), dest[lo:hi],
                                  writes=writes)
