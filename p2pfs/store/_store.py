"""The chunk store: one path from a read to verified bytes in a destination buffer.

    get / prefetch / serve_peer ─┐ (a pooled, page-aligned buffer per coalesced run)
    fill ────────────────────────┤ (the client's memory)
                                 ▼
        memory hit? ──► bytes            in flight? ──► wait on that flight
        else claim a flight per chunk (FlightTable) and land it through the tiers:
            disk (xxh3-checked) ──► peers (sha256-checked) ──► origin (sha256-checked)
        each tier gets what the ones before could not serve, into the same destinations
        landed: memory tier (store buffers) ──► waiters ──► write-back of new bytes

Concurrency invariants (docs/ARCHITECTURE.md, "One chunk path"):
- `FlightTable` is only touched on the trio thread; claiming a digest and inserting its
  flight happen in one call, never across an await.
- Every flight a load owns ends (data or error), also when its task is cancelled, so no
  reader waits forever; readers also bound their wait with `read_timeout`.
- Nothing writes into a destination after the load that owns it returns: tiers never
  abandon a thread, and every network receive has a socket deadline.
- A chunk a fill landed in its client's memory is registered as being written before its
  flight ends; a reader that finds it in no tier waits for that write, never fetches it
  again.
- Write-back never blocks a reader: a full queue drops the write (counted). `warm` and
  `fill` without a `writes` nursery are the callers that wait for the disk.
- Loads run in the store's nursery (owned by the daemon) or in the fill's own task; they
  hand errors to the flights' readers, so one failed chunk never takes the daemon down.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import trio

from .._buffers import aligned_empty
from ..config import CacheConfig, FetchConfig
from ..diskcache import DiskCache
from ..errors import (CacheFull, FetchTimeout, InternalError, P2PFSError, PeerMiss,
                      RecentlyFailed)
from ..failures import RecentFailures
from ..metrics import Metrics
from ..origin import Origin
from ..plan import ChunkLoc, Spot, coalesce, coalesce_items
from ._flights import Flight, FlightTable
from ._idle import IdleCpus
from ._memory import Buffer, MemoryTier
from ._tiers import DiskTier, OriginTier, Slot, Tier

log = logging.getLogger("p2pfs.store")

#: The longest a chunk's write-back waits for idle CPU (a container's start is a burst of
#: seconds; a node that is busy for longer writes back anyway).
WRITEBACK_MAX_DEFER_S = 3.0
#: A write-back worker takes the queued chunks up to this many bytes per thread call.
WRITEBACK_BATCH_BYTES = 8 << 20


class ChunkStore:
    def __init__(self, origin: Origin, disk: DiskCache, *, fetch: FetchConfig,
                 cache: CacheConfig, metrics: Metrics, peers: "Tier | None" = None,
                 owner_peers: "Tier | None" = None) -> None:
        """`peers`: the tier that asks a chunk's owner (reads of our own); `owner_peers`:
        the one an owner uses when serving a peer's request (asks rank 2 what it holds,
        never the requester). Both None: no peers, the daemon behaves as a lone node."""
        self.origin = origin
        self.disk = disk
        self.cfg = fetch
        self.metrics = metrics
        self.memory = MemoryTier(cache.memory_size)
        self.flights = FlightTable()
        self.disk_tier = DiskTier(disk, metrics)
        self.origin_tier = OriginTier(origin, fetch, metrics)
        self.tiers: list[Tier] = [self.disk_tier, *([peers] if peers else []), self.origin_tier]
        self.owner_tiers: list[Tier] = [self.disk_tier, *([owner_peers] if owner_peers else []),
                                        self.origin_tier]
        self._failed = RecentFailures(fetch.fail_fast)
        self._wb_send, self._wb_recv = trio.open_memory_channel[
            tuple[ChunkLoc, Buffer, str | None, float]](cache.writeback_queue)
        self._wb_pending: dict[str, trio.Event] = {}
        # Chunks a fill landed in its client's memory and is writing to disk: in neither the
        # memory tier nor the disk until the write ends, so a reader waits for it (below).
        self._fill_writing: set[str] = set()
        self._wb_workers = cache.writeback_workers
        self._wb_bytes = 0  # bytes of the chunks in the write-back queue
        self._wb_limit = cache.writeback_bytes
        self._idle = IdleCpus(cache.writeback_idle_cpus)
        # A fill's writes in progress, counted in its largest chunks (32 at the defaults).
        self._fill_writes = trio.Semaphore(max(1, min(cache.writeback_queue,
                                                      cache.writeback_bytes // fetch.max_request)))
        self._nursery: trio.Nursery | None = None
        self._sealer = trio.CapacityLimiter(1)  # one file read back at a time
        self._sealing: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the store's workers until cancelled. Start with `await nursery.start(store.run)`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self._wb_workers):
                nursery.start_soon(self._writeback_worker)
            task_status.started()
            await trio.sleep_forever()

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    @property
    def readahead_limit(self) -> int:
        """The most read-ahead worth issuing at once: chunks fetched ahead wait in the
        memory tier until read, so a window larger than half of it evicts its own chunks
        before the reader gets there (measured: 2.8x disk reads for one sequential read)."""
        return self.memory.budget // 2

    @property
    def memory_used(self) -> int:
        return self.memory.used

    @property
    def writeback_pending(self) -> int:
        return len(self._wb_pending)

    # -- reading into store buffers -------------------------------------------------------
    async def get(self, locs: Sequence[ChunkLoc], *, timeout: float | None = None,
                  used: Sequence[int] | None = None) -> list[Buffer]:
        """The verified bytes of each chunk, in order. Raises FetchTimeout past `timeout`
        (default: the configured read_timeout), or the error that failed a chunk. `used`:
        how many bytes of each chunk the caller serves (memory hits count those, not the
        whole chunk, in bytes by source)."""
        return [data for data, _ in await self._read(locs, timeout, self.tiers, used)]

    async def serve_peer(self, loc: ChunkLoc, *, cached_only: bool = False,
                         timeout: float | None = None) -> tuple[Buffer, str]:
        """A chunk for a peer that asked us (its owner, or rank 2 with `cached_only`), and
        where it came from. With `cached_only`, only memory or disk serve it (PeerMiss
        otherwise): rank 2 is asked before the origin, and must not fetch in its turn."""
        if not cached_only:
            ((data, source),) = await self._read([loc], timeout, self.owner_tiers)
            return data, source
        data = self._mem_hit(loc)
        if data is not None:
            return data, "memory"
        # Never wait on a flight here: ours may be waiting on the very node asking (it is
        # the owner we asked, now asking us as its rank 2), which would deadlock both.
        if self.disk.may_hold(loc.digest):
            buf = aligned_empty(loc.ref.size)
            ok = await trio.to_thread.run_sync(self.disk.read_into, loc.digest, buf)
            if ok:
                self.metrics.hits["disk"] += 1
                return buf, "disk"
        raise PeerMiss(f"{loc.digest[:12]}: not held here")

    def prefetch(self, locs: Sequence[ChunkLoc]) -> None:
        """Start fetching chunks that are not in memory or in flight; do not wait."""
        missing = [loc for loc in locs if loc.digest not in self.memory and loc.digest not in self.flights]
        if missing:
            self.metrics.prefetched_chunks += len(missing)
            flights, owned = self.flights.claim(loc.digest for loc in missing)
            self._start([(loc, f) for loc, f, o in zip(missing, flights, owned) if o], self.tiers)

    async def _read(self, locs: Sequence[ChunkLoc], timeout: float | None,
                    tiers: list[Tier], used: Sequence[int] | None = None
                    ) -> list[tuple[Buffer, str]]:
        out: list[tuple[Buffer, str] | None] = []
        for i, loc in enumerate(locs):
            data = self._mem_hit(loc, None if used is None else used[i])
            out.append(None if data is None else (data, "memory"))
        missing = [loc for loc, d in zip(locs, out) if d is None]
        if not missing:
            return out  # type: ignore[return-value]
        limit = self.cfg.read_timeout if timeout is None else timeout
        await self._await_fill_writes(missing, limit)
        now = trio.current_time()
        for loc in missing:
            if (failure := self._failed.check(loc.digest, now)) is not None:
                self.metrics.errors["fail_fast"] += 1
                raise RecentlyFailed(
                    f"{loc.key}@{loc.ref.offset}: failed {now - failure.at:.1f}s ago "
                    f"({failure.error}); not retried for {self.cfg.fail_fast:g}s after a failure")
        flights, owned = self.flights.claim(loc.digest for loc in missing)
        for f, o in zip(flights, owned):
            f.waiters += not o
        self._start([(loc, f) for loc, f, o in zip(missing, flights, owned) if o], tiers)
        with trio.move_on_after(limit):
            it = iter(flights)
            for i, d in enumerate(out):
                if d is None:
                    f = next(it)
                    await f.event.wait()
                    if f.error is not None:
                        raise f.error  # recorded as a recent failure where the flight ended
                    out[i] = (f.data, f.source)  # type: ignore[assignment]
            return out  # type: ignore[return-value]
        self.metrics.errors["timeout"] += 1
        error = FetchTimeout(f"chunks of {missing[0].key} not available within {limit}s")
        now = trio.current_time()
        for loc, f in zip(missing, flights):
            if not f.done:
                self._failed.record(loc.digest, error, now)
        raise error

    async def _await_fill_writes(self, locs: Sequence[ChunkLoc], limit: float) -> None:
        """Wait (at most `limit`) for the disk writes of any of `locs` that a fill landed in
        its client's memory: such a chunk's flight has ended and it is in no tier until its
        write ends, so without this a reader would fetch it again (the bytes cross the
        network twice). A write that fails or takes too long leaves the reader to the tiers."""
        waits = [self._wb_pending[loc.digest] for loc in locs
                 if loc.digest in self._fill_writing and loc.digest in self._wb_pending]
        if waits:
            with trio.move_on_after(limit):
                for done in waits:
                    await done.wait()

    def _start(self, owned: list[tuple[ChunkLoc, Flight]], tiers: list[Tier]) -> None:
        """Load chunks whose flights we own into fresh store buffers, one buffer and one
        task per coalesced run (a run's chunks are back to back in its buffer, so the
        origin receives it with one GET, and with no copy where they are also back to back
        in their blob and stored raw)."""
        assert self._nursery is not None, "ChunkStore.run() is not running"
        for run in coalesce_items(owned, self.cfg.max_request, loc=lambda item: item[0],
                                  max_gap=self.cfg.max_gap):
            buf = aligned_empty(sum(loc.ref.size for loc, _ in run))
            slots, pos = [], 0
            for loc, f in run:
                slots.append(Slot(loc, buf, pos, f, owned=True))
                pos += loc.ref.size
            self._nursery.start_soon(self._load, slots, tiers, None,
                                     "fetch cancelled (the daemon is shutting down)")

    # -- filling a caller's memory --------------------------------------------------------
    async def fill(self, locs: Sequence[ChunkLoc], dest: memoryview, *,
                   timeout: float | None = None, writes: trio.Nursery | None = None) -> None:
        """Write the verified bytes of `locs` into `dest` (their sizes back to back) and
        make them local.

        The zero-copy path of `fill` requests (control/): chunks whose flights this call
        owns land straight in `dest` through the same tiers as every read (a disk hit with
        O_DIRECT, a raw run from the origin with one GET); memory hits and chunks another
        reader is already fetching are copied. Returns once `dest` holds verified bytes.
        Raises the first error; FetchTimeout when others' fetches take past `timeout`.

        Disk writes of new bytes: without `writes`, done before returning. With it,
        started as tasks in that nursery (whose owner keeps `dest` mapped until they end),
        at most `writeback_bytes / max_request` at once, so the caller is answered without waiting
        for the disk. `dest` is the caller's memory and may change once we answer: the
        xxh3 the cache files are named by is taken from the verified bytes before that, so
        a write of changed bytes is caught on read-back, never served."""
        limit = self.cfg.read_timeout if timeout is None else timeout
        await self._await_fill_writes(locs, limit)
        copies: list[tuple[memoryview, Buffer]] = []
        waits: list[tuple[memoryview, Flight, ChunkLoc]] = []
        own: list[Slot] = []
        pos = 0
        # No await in this loop: checking and claiming flights must not interleave.
        for loc in locs:
            view = dest[pos:pos + loc.ref.size]
            data = self._mem_hit(loc)
            if data is not None:
                copies.append((view, data))
            elif (f := self.flights.join(loc.digest)) is not None:
                waits.append((view, f, loc))
            else:
                (f,), _ = self.flights.claim([loc.digest])
                own.append(Slot(loc, dest, pos, f, owned=False))
            pos += loc.ref.size
        if pos != len(dest):
            for slot in own:
                self.flights.fail(slot.flight, InternalError("fill aborted"))
            raise ValueError(f"fill: destination holds {len(dest)} bytes, chunks {pos}")

        async def wait_copy(view: memoryview, f: Flight, loc: ChunkLoc) -> None:
            await self._wait(f, limit, loc)
            copies.append((view, f.data))  # type: ignore[arg-type]

        try:
            async with trio.open_nursery() as nursery:
                if own:
                    nursery.start_soon(self._load, own, self.tiers, writes,
                                       "the fill that was fetching this chunk ended (its client left)")
                for view, f, loc in waits:
                    nursery.start_soon(wait_copy, view, f, loc)
        except BaseExceptionGroup as group:
            failure = first_failure(group)
            if failure is None:
                raise  # cancelled from outside
            raise failure from None
        for slot in own:
            if slot.flight.error is not None:
                raise slot.flight.error
        if copies:
            def copy_all() -> None:
                for view, data in copies:
                    view[:] = data
            await trio.to_thread.run_sync(copy_all)

    async def _wait(self, f: Flight, limit: float, loc: ChunkLoc) -> None:
        with trio.move_on_after(limit):
            await f.event.wait()
        if not f.done:
            self.metrics.errors["timeout"] += 1
            raise FetchTimeout(f"chunks of {loc.key} not available within {limit}s")
        if f.error is not None:
            raise f.error

    async def warm(self, locs: Sequence[ChunkLoc], progress: Callable[[int], None] | None = None) -> None:
        """Make every chunk local (on disk), fetching in order with the store's full
        parallelism; returns when all of them are written. Raises the first error. Chunks
        go through `fill` into a scratch buffer, so warming does not churn the memory tier
        that readers depend on."""
        window = trio.Semaphore(max(2, self.cfg.concurrency))

        async def one(batch: Sequence[ChunkLoc]) -> None:
            try:
                todo = [loc for loc in batch if not self.disk.holds(loc.digest, loc.spot)]
                if todo:
                    buf = aligned_empty(sum(loc.ref.size for loc in todo))
                    await self.fill(todo, buf)
                    await self._keep_copied(todo, buf)
                if progress:
                    progress(sum(loc.ref.size for loc in batch))
            finally:
                window.release()

        async with trio.open_nursery() as nursery:
            for req in coalesce(locs, self.cfg.max_request, self.cfg.max_gap):
                await window.acquire()
                nursery.start_soon(one, req.locs)
        digests = {loc.digest for loc in locs}
        for digest in digests:
            if (pending := self._wb_pending.get(digest)) is not None:
                await pending.wait()
        lost = len({loc.digest for loc in locs if not self.disk.holds(loc.digest, loc.spot)})
        if lost:
            stats = self.disk.stats()
            raise CacheFull(
                f"{lost} of {len(digests)} chunks could not be kept on local disk: the cache "
                f"budget ({stats.budget_bytes} bytes) is smaller than the data, or writes failed "
                f"({stats.write_errors} write errors); raise --cache-size")

    async def _keep_copied(self, locs: Sequence[ChunkLoc], buf: memoryview) -> None:
        """Write chunks that `fill` copied from others' flights (whose write-back may have
        been dropped from a full queue) and that are still not on disk."""
        pos = 0
        for loc in locs:
            view = buf[pos:pos + loc.ref.size]
            pos += loc.ref.size
            if not self.disk.holds(loc.digest, loc.spot) and loc.digest not in self._wb_pending:
                done = self._wb_pending[loc.digest] = trio.Event()
                try:
                    ok = await trio.to_thread.run_sync(self.disk.write, loc.digest, view, None,
                                                       loc.spot)
                finally:
                    del self._wb_pending[loc.digest]
                    done.set()
                self._count_write(ok, loc.spot)

    # -- the one load path ----------------------------------------------------------------
    async def _load(self, slots: list[Slot], tiers: list[Tier], writes: trio.Nursery | None,
                    cancelled: str) -> None:
        """Land every slot through `tiers` in order; end every slot's flight whatever
        happens. `writes`: where a fill's disk writes go (None: awaited here for a fill's
        slots; store buffers go to the write-back queue)."""
        try:
            await self._through(slots, tiers, writes, trio.current_time() + self.cfg.read_timeout)
        except BaseException as exc:
            leaf = first_failure(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if leaf is None or isinstance(leaf, trio.Cancelled):
                err: BaseException = FetchTimeout(cancelled)
            elif isinstance(leaf, P2PFSError):
                err = leaf
            else:  # a bug of ours: say so, and blame neither the store nor a peer
                self.metrics.errors["internal"] += 1
                log.error("load of %s failed unexpectedly (please report)", slots[0].loc.key,
                          exc_info=leaf)
                err = InternalError(f"load of {slots[0].loc.key} failed: {leaf!r} "
                                    "(a p2pfs bug; see the log)")
            for slot in slots:
                if not slot.flight.done:
                    self._fail(slot, err, record=not isinstance(err, FetchTimeout))
            if not isinstance(exc, Exception):
                raise  # cancellation: the flights' readers have their answer
        # Errors are the flights' to report: a load in the store's nursery must never
        # take the daemon down, and a fill reads its slots' flights.

    async def _through(self, slots: list[Slot], tiers: Sequence[Tier],
                       writes: trio.Nursery | None, deadline: float) -> None:
        pending = slots
        for i, tier in enumerate(tiers):
            if not pending:
                return
            if getattr(tier, "per_chunk", False) and len(pending) > 1:
                # From here on each chunk goes alone: one chunk's slow peer must not hold
                # back the others, and two owners must never wait on each other's batch
                # (A's batch waits for a chunk from B while B's batch, holding the flight
                # A's chunk needs, waits for one from A).
                async with trio.open_nursery() as nursery:
                    for slot in pending:
                        nursery.start_soon(self._through, [slot], tiers[i:], writes, deadline)
                return
            outcomes = await tier.read_into(pending, deadline)
            landed, rest = [], []
            for slot, out in zip(pending, outcomes):
                if out is True:
                    landed.append(slot)
                elif out is False:
                    rest.append(slot)
                else:
                    self._fail(slot, out)
            if tier is self.disk_tier:
                self.metrics.misses += len(rest)
            await self._land(landed, tier.name, writes)
            pending = rest
        for slot in pending:
            self._fail(slot, InternalError(f"no tier served {slot.loc.digest[:12]}"))

    async def _land(self, landed: list[Slot], source: str, writes: trio.Nursery | None) -> None:
        """End the flights of slots whose destinations now hold verified bytes."""
        if not landed:
            return
        # A fill's destination is the client's: others waiting get a copy. Decide who needs
        # one and end the rest without an await in between, so no waiter can slip in.
        needs_copy = [s for s in landed if not s.owned and s.flight.waiters]
        new = [s for s in landed if s.xxh is not None and s.loc.digest not in self._wb_pending]
        fill_writes = [s for s in new if not s.owned]
        for slot in fill_writes:  # before the flights end, so no reader finds neither
            self._wb_pending[slot.loc.digest] = trio.Event()
            self._fill_writing.add(slot.loc.digest)
        try:
            await self._end_flights(landed, needs_copy, source)
        except BaseException:
            for slot in fill_writes:  # cancelled before the writes: release the readers
                self._wb_done(slot.loc.digest)
            raise
        if fill_writes:
            await self._write_fill(fill_writes, writes)
        if new and all(s.owned for s in new):  # only these go to the queue recorded checked
            for slot in new:
                size = slot.loc.ref.size
                try:
                    if self._wb_bytes + size <= self._wb_limit:
                        self._wb_send.send_nowait((slot.loc, slot.dest, slot.xxh, trio.current_time()))
                        self._wb_pending[slot.loc.digest] = trio.Event()
                        self._wb_bytes += size
                        continue
                except trio.WouldBlock:
                    pass
                self.metrics.writeback_dropped += 1  # the queue is full (bytes or chunks)

    async def _end_flights(self, landed: list[Slot], needs_copy: list[Slot], source: str) -> None:
        for slot in landed:
            self._failed.clear(slot.loc.digest)
            if slot.owned:
                self.memory.put(slot.loc.digest, slot.dest)
                self.flights.land(slot.flight, slot.dest, source)
            elif not slot.flight.waiters:
                self.flights.land(slot.flight, None, source)
        if needs_copy:
            datas = await trio.to_thread.run_sync(lambda: [bytes(s.dest) for s in needs_copy])
            for slot, data in zip(needs_copy, datas):
                self.memory.put(slot.loc.digest, data)
                self.flights.land(slot.flight, data, source)

    async def _write_fill(self, slots: list[Slot], writes: trio.Nursery | None) -> None:
        """Write the chunks a fill landed in its client's memory (their `_wb_pending` entries
        are registered; each is ended when its write ends)."""
        if writes is not None:
            for i, slot in enumerate(slots):
                try:
                    await self._fill_writes.acquire()
                except BaseException:
                    for rest in slots[i:]:
                        self._wb_done(rest.loc.digest)
                    raise
                writes.start_soon(self._deferred_write, slot.loc, slot.dest, slot.xxh)
            return

        def write_all() -> list[bool]:
            return [self.disk.write(s.loc.digest, s.dest, s.xxh, s.loc.spot) for s in slots]
        try:
            oks = await trio.to_thread.run_sync(write_all)
        finally:
            for slot in slots:
                self._wb_done(slot.loc.digest)
        for slot, ok in zip(slots, oks):
            self._count_write(ok, slot.loc.spot)

    def _fail(self, slot: Slot, error: BaseException, *, record: bool = True) -> None:
        if self.flights.fail(slot.flight, error) and record and isinstance(error, P2PFSError):
            # Recorded where the flight ends, not where a reader gives up: a reader that
            # fails on its first chunk must not leave the next ones (in flight, failing a
            # moment later) to cost the kernel's retry a second deadline.
            self._failed.record(slot.loc.digest, error, trio.current_time())

    def _mem_hit(self, loc: ChunkLoc, used: int | None = None) -> Buffer | None:
        data = self.memory.get(loc.digest)
        if data is not None:
            self.metrics.hits["memory"] += 1
            self.metrics.bytes_by_source["memory"] += len(data) if used is None else used
        return data

    # -- write-back -----------------------------------------------------------------------
    async def _deferred_write(self, loc: ChunkLoc, chunk: memoryview, xxh: str) -> None:
        try:
            ok = await trio.to_thread.run_sync(self.disk.write, loc.digest, chunk, xxh, loc.spot)
        finally:
            self._wb_done(loc.digest)
            self._fill_writes.release()
        self._count_write(ok, loc.spot)

    async def _writeback_worker(self) -> None:
        """Write queued chunks back, a batch per worker thread call: what is queued when the
        worker wakes, up to WRITEBACK_BATCH_BYTES. An image layer's start-up queues
        thousands of small chunks, and a thread hand-off per chunk cost more CPU (context
        switches, the GIL passed back and forth) than the writes themselves."""
        write = functools.partial(self.disk.write, owned=True)
        async for first in self._wb_recv:
            await self._cpu_to_spare(first[3])
            # With CPU to spare, all that is queued; on a busy machine only what keeps the
            # queue at least half full (the rest waits for idle CPU, as `first` did).
            idle = self._idle.enough()
            batch, size = [first], first[0].ref.size
            for _ in range(self._wb_recv.statistics().current_buffer_used):
                if size >= WRITEBACK_BATCH_BYTES or not idle and (
                        self._wb_bytes - size) * 2 < self._wb_limit:
                    break
                batch.append(self._wb_recv.receive_nowait())
                size += batch[-1][0].ref.size
            oks: list[bool] = []
            try:
                # The queue carries only the daemon's own buffers (see _land): checked.
                await trio.to_thread.run_sync(
                    lambda: oks.extend(write(loc.digest, data, xxh, loc.spot)
                                       for loc, data, xxh, _ in batch))
            finally:
                for loc, *_ in batch:
                    self._wb_bytes -= loc.ref.size
                    self._wb_done(loc.digest)
            files = {}
            for (loc, *_), ok in zip(batch, oks):
                self._count_write(ok)
                if ok and loc.spot is not None:
                    files[loc.spot.file] = None
            for fid in files:
                self._seal_soon(fid)

    async def _cpu_to_spare(self, queued: float) -> None:
        """Return once enough CPU is idle (`cache.writeback_idle_cpus`), at once while the
        queue is at least half full, and at the latest WRITEBACK_MAX_DEFER_S after the
        chunk was queued (a node that stays busy still writes everything back). Write-back
        is the background half of a read: on a node whose cores are busy (a container
        starting on few of them), creating and writing the cache's files would take CPU
        from the very readers it follows."""
        while self._wb_bytes * 2 < self._wb_limit and not self._idle.enough():
            left = queued + WRITEBACK_MAX_DEFER_S - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(min(IdleCpus.WINDOW, left))

    def _wb_done(self, digest: str) -> None:
        self._fill_writing.discard(digest)
        done = self._wb_pending.pop(digest, None)
        if done is not None:
            done.set()

    def _count_write(self, ok: bool, spot: Spot | None = None) -> None:
        if ok:
            self.metrics.writeback_done += 1
            if spot is not None:
                self._seal_soon(spot.file)
        else:
            self.metrics.errors["writeback"] += 1

    # -- whole files ----------------------------------------------------------------------
    def _seal_soon(self, fid: str) -> None:
        """Once a file is whole on disk, read back in the background what came from memory
        we do not own, and seal it (DiskCache.seal), so that the next load of it is handed
        the local file instead of reading through the mount."""
        if fid in self._sealing or self._nursery is None or not self.disk.needs_seal(fid):
            return
        self._sealing.add(fid)
        self._nursery.start_soon(self._seal, fid)

    async def _seal(self, fid: str) -> bool:
        try:
            async with self._sealer:
                return await trio.to_thread.run_sync(self.disk.seal, fid)
        finally:
            self._sealing.discard(fid)

    async def open_local(self, fid: str) -> int | None:
        """A read-only descriptor of the local copy of the file with content id `fid`, if
        it is whole and checked (sealed now if it is whole but not sealed yet); None if
        any of it is not on local disk. The caller owns the descriptor."""
        if not self.disk.complete(fid):
            return None
        async with self._sealer:
            if not await trio.to_thread.run_sync(
                    lambda: self.disk.seal(fid, into_page_cache=True)):
                return None
        return await trio.to_thread.run_sync(self.disk.open_sealed, fid)


def first_failure(exc: BaseException) -> BaseException | None:
    """The error to report from an exception group: its first P2PFSError, else its first
    leaf that is not a cancellation; None if it holds only cancellations."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    for e in leaves:
        if isinstance(e, P2PFSError):
            return e
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), None)
