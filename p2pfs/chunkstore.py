"""The chunk store: memory LRU -> disk cache -> origin, with single-flight and write-back.

    get(locs) ──► memory hit ──────────────────────────────────────────► bytes
                  in flight?  ──► wait on that flight
                  else start a flight per chunk; one task per coalesced run:
                      disk cache (xxh3-checked) ──► hit
                      origin ranged GET (retries, backoff + jitter, deadline)
                          ──► split ──► zstd? ──► sha256 check ──► memory ──► waiters
                                                                 └─► write-back queue (bounded)

Concurrency invariants (docs/ARCHITECTURE.md):
- A digest has at most one flight; `_flights` is only mutated on the trio thread, and never
  across an await between checking and inserting.
- A flight always ends (data or error), also when its task is cancelled, so no reader waits
  forever; readers additionally bound their wait with `read_timeout`.
- Write-back never blocks a reader: a full queue drops the write (counted). `warm` (explicit
  prefetch) is the one caller that waits for the disk, because making data local is its job.
- Fetch tasks run in the store's own nursery, owned by the daemon; they catch their errors
  and hand them to the waiting readers, so one failed chunk never takes the daemon down.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from typing import Awaitable, Callable, Sequence, TypeVar

import trio
import xxhash
import zstandard

from .config import CacheConfig, FetchConfig
from .diskcache import DiskCache
from .errors import (CacheFull, FetchTimeout, IntegrityError, InternalError, OriginError,
                     P2PFSError, RecentlyFailed, is_temp_failure)
from .failures import RecentFailures
from .lru import ByteLRU
from .metrics import Metrics
from .origin import Origin
from .plan import ChunkLoc, Request, coalesce, split_response

log = logging.getLogger("p2pfs.chunkstore")
T = TypeVar("T")


class _Flight:
    __slots__ = ("event", "data", "error", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.waiters = 0  # readers besides the flight's owner (a fill copies out only for them)


def verify_chunk(loc: ChunkLoc, stored: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """Decompress (if needed) and check the sha256 of one chunk. Pure, CPU-bound."""
    ref = loc.ref
    if ref.compression == "zstd":
        try:
            # zstd allocates what the frame header declares and ignores max_output_size
            # then: a 65 KB frame may declare 2 GiB. Check the declaration first, so
            # memory per chunk is bounded by the manifest's (bounded) size.
            declared = zstandard.frame_content_size(stored)
            if declared not in (-1, ref.size):
                raise IntegrityError(f"{loc.key}@{ref.offset}: zstd frame declares {declared} "
                                     f"bytes, the manifest {ref.size}")
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=ref.size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{loc.key}@{ref.offset}: bad zstd frame ({exc})") from None
    else:
        data = stored  # any contiguous buffer; slices of a larger response stay views
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IntegrityError(
            f"{loc.key}@{ref.offset}+{ref.length}: sha256 mismatch (the object changed since it "
            "was indexed, or the store returned bad data); re-run `p2pfs index`"
        )
    return data


class ChunkStore:
    def __init__(self, origin: Origin, disk: DiskCache, *, fetch: FetchConfig,
                 cache: CacheConfig, metrics: Metrics) -> None:
        self.origin = origin
        self.disk = disk
        self.cfg = fetch
        self.metrics = metrics
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_lru: ByteLRU[str] = ByteLRU(cache.memory_size)
        self._flights: dict[str, _Flight] = {}
        self._failed = RecentFailures(fetch.fail_fast)
        self._origin_limiter = trio.CapacityLimiter(fetch.concurrency)
        self._disk_limiter = trio.CapacityLimiter(8)
        self._wb_send, self._wb_recv = trio.open_memory_channel[tuple[str, bytes]](cache.writeback_queue)
        self._wb_pending: set[str] = set()
        self._wb_workers = cache.writeback_workers
        self._fill_writes = trio.Semaphore(max(1, cache.writeback_queue))
        self._nursery: trio.Nursery | None = None

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
        return len(self._flights)

    @property
    def readahead_limit(self) -> int:
        """The most read-ahead worth issuing at once: chunks fetched ahead wait in the
        memory tier until read, so a window larger than half of it evicts its own chunks
        before the reader gets there (measured: 2.8x disk reads for one sequential read)."""
        return self._mem_lru.budget // 2

    @property
    def memory_used(self) -> int:
        return self._mem_lru.used

    @property
    def writeback_pending(self) -> int:
        return len(self._wb_pending)

    # -- reading --------------------------------------------------------------------------
    async def get(self, locs: Sequence[ChunkLoc], *, timeout: float | None = None) -> list[bytes]:
        """The verified bytes of each chunk, in order. Raises FetchTimeout past `timeout`
        (default: the configured read_timeout), or the error that failed a chunk."""
        out: list[bytes | None] = [self._mem_get(loc) for loc in locs]
        missing = [loc for loc, d in zip(locs, out) if d is None]
        if not missing:
            return out  # type: ignore[return-value]
        now = trio.current_time()
        for loc in missing:
            if (failure := self._failed.check(loc.digest, now)) is not None:
                self.metrics.errors["fail_fast"] += 1
                raise RecentlyFailed(
                    f"{loc.key}@{loc.ref.offset}: failed {now - failure.at:.1f}s ago "
                    f"({failure.error}); not retried for {self.cfg.fail_fast:g}s after a failure")
        flights = self._start(missing)
        for f in flights:
            f.waiters += 1
        limit = self.cfg.read_timeout if timeout is None else timeout
        with trio.move_on_after(limit):
            j = 0
            for i, d in enumerate(out):
                if d is None:
                    f = flights[j]
                    j += 1
                    await f.event.wait()
                    if f.error is not None:
                        raise f.error  # recorded as a recent failure where the flight ended
                    out[i] = f.data
            return out  # type: ignore[return-value]
        self.metrics.errors["timeout"] += 1
        error = FetchTimeout(f"chunks of {missing[0].key} not available within {limit}s")
        now = trio.current_time()
        for loc, f in zip(missing, flights):
            if not f.event.is_set():
                self._failed.record(loc.digest, error, now)
        raise error

    def prefetch(self, locs: Sequence[ChunkLoc]) -> None:
        """Start fetching chunks that are not in memory or in flight; do not wait."""
        missing = [loc for loc in locs if loc.digest not in self._mem and loc.digest not in self._flights]
        if missing:
            self.metrics.prefetched_chunks += len(missing)
            self._start(missing)

    async def warm(self, locs: Sequence[ChunkLoc], progress: Callable[[int], None] | None = None) -> None:
        """Make every chunk local (on disk), fetching in order with the store's full
        parallelism; returns when all of them are written. Raises the first error."""
        batches: list[list[ChunkLoc]] = []
        for req in coalesce(locs, self.cfg.max_request):
            batches.append(list(req.locs))
        window = trio.Semaphore(max(2, self.cfg.concurrency))

        async def one(batch: list[ChunkLoc]) -> None:
            try:
                todo = [loc for loc in batch if loc.digest not in self.disk]
                if todo:
                    datas = await self.get(todo)
                    for loc, data in zip(todo, datas):
                        if loc.digest not in self.disk and loc.digest not in self._wb_pending:
                            self._wb_pending.add(loc.digest)
                            await self._wb_send.send((loc.digest, data))
                if progress:
                    progress(sum(loc.ref.size for loc in batch))
            finally:
                window.release()

        async with trio.open_nursery() as nursery:
            for batch in batches:
                await window.acquire()
                nursery.start_soon(one, batch)
        digests = {loc.digest for loc in locs}
        while self._wb_pending & digests:
            await trio.sleep(0.02)
        lost = sum(1 for d in digests if d not in self.disk)
        if lost:
            stats = self.disk.stats()
            raise CacheFull(
                f"{lost} of {len(digests)} chunks could not be kept on local disk: the cache "
                f"budget ({stats.budget_bytes} bytes) is smaller than the data, or writes failed "
                f"({stats.write_errors} write errors); raise --cache-size")

    # -- filling a caller's memory ------------------------------------------------------
    async def fill(self, locs: Sequence[ChunkLoc], dest: memoryview, *,
                   timeout: float | None = None, writes: trio.Nursery | None = None) -> None:
        """Write the verified bytes of `locs` into `dest` (their sizes back to back) and
        make them local.

        The zero-copy path of `fill` requests (control.py): a missing raw chunk is received
        from the origin straight into `dest`, checked there and written to the disk cache
        from there; a disk hit is read into `dest` with O_DIRECT. Memory hits and chunks
        another reader is already fetching are copied. Returns once `dest` holds verified
        bytes. Raises the first error; FetchTimeout when others' fetches take past
        `timeout`.

        Disk writes of what we fetched: without `writes`, done before returning. With it,
        started as tasks in that nursery (whose owner keeps `dest` mapped until they end),
        at most `cache.writeback_queue` at once, so the caller is answered without waiting
        for the disk. `dest` is the caller's memory and may change once we answer: the
        xxh3 the cache files are named by is taken from the verified bytes before that, so
        a write of changed bytes is caught on read-back, never served."""
        limit = self.cfg.read_timeout if timeout is None else timeout
        copies: list[tuple[memoryview, bytes]] = []
        waits: list[tuple[memoryview, _Flight]] = []
        own: list[tuple[ChunkLoc, int, _Flight]] = []
        pos = 0
        # No await in this loop: checking and claiming flights must not interleave.
        for loc in locs:
            view = dest[pos:pos + loc.ref.size]
            data = self._mem_get(loc)
            if data is not None:
                copies.append((view, data))
            elif (f := self._flights.get(loc.digest)) is not None or loc.ref.compression != "none":
                f = f or self._start([loc])[0]  # compressed: the normal path decompresses
                f.waiters += 1
                waits.append((view, f))
            else:
                f = self._flights[loc.digest] = _Flight()
                own.append((loc, pos, f))
            pos += loc.ref.size
        if pos != len(dest):
            for loc, _, f in own:
                self._end_fill(loc, f, None, OriginError("fill aborted"))
            raise ValueError(f"fill: destination holds {len(dest)} bytes, chunks {pos}")

        async def wait_copy(view: memoryview, f: _Flight) -> None:
            with trio.move_on_after(limit):
                await f.event.wait()
            if not f.event.is_set():
                self.metrics.errors["timeout"] += 1
                raise FetchTimeout(f"chunks of {locs[0].key} not available within {limit}s")
            if f.error is not None:
                raise f.error
            copies.append((view, f.data))

        try:
            async with trio.open_nursery() as nursery:
                if own:
                    nursery.start_soon(self._fill_own, own, dest, writes)
                for view, f in waits:
                    nursery.start_soon(wait_copy, view, f)
        except BaseExceptionGroup as group:
            failure = first_failure(group)
            if failure is None:
                raise  # cancelled from outside
            raise failure from None
        if copies:
            def copy_all() -> None:
                for view, data in copies:
                    view[:] = data
            await trio.to_thread.run_sync(copy_all)

    async def _fill_own(self, own: list[tuple[ChunkLoc, int, _Flight]], dest: memoryview,
                        writes: trio.Nursery | None) -> None:
        """Fetch the chunks whose flights this fill owns into `dest`. Every flight ends,
        with data or an error, whatever happens (cancellation included). Threads are never
        abandoned: when this returns, nothing of ours writes into `dest` any more."""
        first_error: BaseException | None = None
        try:
            missing = await self._fill_from_disk(own, dest)
            self.metrics.misses += len(missing)
            async with trio.open_nursery() as nursery:
                for run in _runs(missing, self.cfg.max_request):
                    nursery.start_soon(self._fill_from_origin, run, dest, writes)
        except BaseException as exc:
            first_error = first_failure(exc) if isinstance(exc, BaseExceptionGroup) else exc
            raise
        finally:
            fetch_failed = isinstance(first_error, P2PFSError)
            if fetch_failed:
                err: BaseException = first_error  # type: ignore[assignment]
            elif isinstance(first_error, trio.Cancelled):
                err = FetchTimeout("the fill that was fetching this chunk ended (its client left)")
            else:
                log.error("fill failed unexpectedly (please report): %r", first_error)
                err = InternalError(f"fill ended without data ({first_error!r})")
            for loc, _, f in own:
                if not f.event.is_set():
                    self._end_fill(loc, f, None, err, failed=fetch_failed)

    async def _fill_from_disk(self, own: list[tuple[ChunkLoc, int, _Flight]],
                              dest: memoryview) -> list[tuple[ChunkLoc, int, _Flight]]:
        missing: list[tuple[ChunkLoc, int, _Flight]] = []

        async def one(item: tuple[ChunkLoc, int, _Flight]) -> None:
            loc, pos, f = item
            view = dest[pos:pos + loc.ref.size]
            async with self._disk_limiter:
                ok = await trio.to_thread.run_sync(self.disk.read_into, loc.digest, view)
            if not ok:  # a miss; the disk cache counts why (corrupt, read error, raced)
                missing.append(item)
                return
            self.metrics.hits["disk"] += 1
            self.metrics.bytes_by_source["disk"] += loc.ref.size
            self._end_fill(loc, f, view, None)

        async with trio.open_nursery() as nursery:
            for item in own:
                if item[0].digest in self.disk:
                    nursery.start_soon(one, item)
                else:
                    missing.append(item)
        missing.sort(key=lambda item: item[1])
        return missing

    async def _fill_from_origin(self, run: list[tuple[ChunkLoc, int, _Flight]],
                                dest: memoryview, writes: trio.Nursery | None) -> None:
        first, start = run[0][0], run[0][1]
        length = sum(loc.ref.size for loc, _, _ in run)
        view = dest[start:start + length]
        await self._origin_call(lambda left: self.origin.get_range_into(
            first.key, first.ref.offset, view, timeout=left))
        self.metrics.bytes_by_source["origin"] += length

        def check() -> list[IntegrityError | str | bool]:
            """Per chunk: the error, or (deferred write) its xxh3, or whether it was kept."""
            out: list[IntegrityError | str | bool] = []
            for loc, pos, _ in run:
                chunk = dest[pos:pos + loc.ref.size]
                try:
                    verify_chunk(loc, chunk)
                except IntegrityError as exc:
                    out.append(exc)
                    continue
                out.append(xxhash.xxh3_64_hexdigest(chunk) if writes is not None
                           else self.disk.write(loc.digest, chunk))
            return out

        results = await trio.to_thread.run_sync(check)
        error: IntegrityError | None = None
        for (loc, pos, f), res in zip(run, results):
            chunk = dest[pos:pos + loc.ref.size]
            if isinstance(res, IntegrityError):
                self.metrics.errors["integrity"] += 1
                self._end_fill(loc, f, None, res, failed=True)
                error = error or res
                continue
            self._end_fill(loc, f, chunk, None)
            if isinstance(res, bool):
                self._count_write(res)
            elif loc.digest not in self._wb_pending:
                await self._fill_writes.acquire()
                self._wb_pending.add(loc.digest)
                writes.start_soon(self._deferred_write, loc.digest, chunk, res)
        if error is not None:
            raise error

    async def _deferred_write(self, digest: str, chunk: memoryview, xxh: str) -> None:
        try:
            ok = await trio.to_thread.run_sync(self.disk.write, digest, chunk, xxh)
        finally:
            self._wb_pending.discard(digest)
            self._fill_writes.release()
        self._count_write(ok)

    def _count_write(self, ok: bool) -> None:
        if ok:
            self.metrics.writeback_done += 1
        else:
            self.metrics.errors["writeback"] += 1

    def _end_fill(self, loc: ChunkLoc, f: _Flight, view: memoryview | None,
                  error: BaseException | None, *, failed: bool = False) -> None:
        """End a flight a fill owns. Readers waiting on it get their own copy: `view` is
        the fill caller's memory. `failed`: the error came from fetching the chunk (not
        from the client going away), so reads of it fail fast for a while."""
        if self._flights.get(loc.digest) is f:
            del self._flights[loc.digest]
        if view is not None:
            self._failed.clear(loc.digest)
        elif failed and error is not None:
            self._failed.record(loc.digest, error, trio.current_time())
        if view is not None and f.waiters:
            data = bytes(view)
            self._mem_put(loc.digest, data)
            f.data = data
        f.error = error
        f.event.set()

    # -- internals ------------------------------------------------------------------------
    def _mem_get(self, loc: ChunkLoc) -> bytes | None:
        data = self._mem.get(loc.digest)
        if data is not None:
            self._mem.move_to_end(loc.digest)
            self._mem_lru.touch(loc.digest)
            self.metrics.hits["memory"] += 1
        return data

    def _mem_put(self, digest: str, data: bytes) -> None:
        self._mem[digest] = data
        self._mem_lru.add(digest, len(data))
        for victim in self._mem_lru.evict(keep=digest):
            self._mem.pop(victim, None)

    def _start(self, locs: Sequence[ChunkLoc]) -> list[_Flight]:
        assert self._nursery is not None, "ChunkStore.run() is not running"
        flights: list[_Flight] = []
        new: list[ChunkLoc] = []
        for loc in locs:
            f = self._flights.get(loc.digest)
            if f is None:
                f = self._flights[loc.digest] = _Flight()
                new.append(loc)
            flights.append(f)
        for req in coalesce(new, self.cfg.max_request):
            self._nursery.start_soon(self._fetch, req)
        return flights

    def _finish(self, loc: ChunkLoc, data: bytes | None, error: BaseException | None) -> None:
        f = self._flights.pop(loc.digest, None)
        if f is None:
            return
        if data is not None:
            self._failed.clear(loc.digest)
            self._mem_put(loc.digest, data)
        elif isinstance(error, P2PFSError):
            # Recorded where the flight ends, not where a reader gives up: a reader that
            # fails on its first chunk must not leave the next ones (in flight, failing a
            # moment later) to cost the kernel's retry a second deadline.
            self._failed.record(loc.digest, error, trio.current_time())
        f.data, f.error = data, error
        f.event.set()

    async def _fetch(self, req: Request) -> None:
        pending = list(req.locs)
        try:
            pending = await self._from_disk(pending)
            for sub in coalesce(pending, self.cfg.max_request):
                await self._from_origin(sub)
        except BaseException as exc:
            # Whatever happened (cancellation included), no waiter may be left hanging.
            if isinstance(exc, P2PFSError):
                err: BaseException = exc
            elif isinstance(exc, trio.Cancelled):
                err = FetchTimeout("fetch cancelled (the daemon is shutting down)")
            else:  # a bug of ours: say so, and do not blame the store for it
                self.metrics.errors["internal"] += 1
                log.exception("fetch of %s failed unexpectedly (please report)", req.key)
                err = InternalError(f"fetch of {req.key} failed: {exc!r} (a p2pfs bug; see the log)")
            for loc in pending:
                self._finish(loc, None, err)
            if isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
                raise
        finally:
            for loc in req.locs:
                if loc.digest in self._flights:
                    self._finish(loc, None, InternalError("fetch ended without data"))

    async def _from_disk(self, locs: list[ChunkLoc]) -> list[ChunkLoc]:
        """Serve what the disk cache has, each chunk in its own thread (parallel I/O);
        return the chunks still missing."""
        candidates = [loc for loc in locs if loc.digest in self.disk]
        got: set[str] = set()

        async def one(loc: ChunkLoc) -> None:
            async with self._disk_limiter:
                data = await trio.to_thread.run_sync(self.disk.read, loc.digest)
            if data is None:  # a miss; the disk cache counts why (corrupt, read error, raced)
                return
            got.add(loc.digest)
            self.metrics.hits["disk"] += 1
            self.metrics.bytes_by_source["disk"] += len(data)
            self._finish(loc, data, None)

        if len(candidates) == 1:
            await one(candidates[0])
        elif candidates:
            async with trio.open_nursery() as nursery:
                for loc in candidates:
                    nursery.start_soon(one, loc)
        rest = [loc for loc in locs if loc.digest not in got]
        self.metrics.misses += len(rest)
        return rest

    async def _origin_call(self, fetch: Callable[[float], Awaitable[T]]) -> T:
        """Run one origin request under the concurrency limit, retrying transient failures
        with full-jitter backoff until the read deadline. `fetch` gets the seconds left
        until that deadline and must end by then: a fill's receive into client memory
        cannot be abandoned, so the bound has to reach the socket."""
        deadline = trio.current_time() + self.cfg.read_timeout
        attempt = 0
        while True:
            try:
                async with self._origin_limiter:
                    t0 = trio.current_time()
                    if t0 >= deadline:
                        self.metrics.errors["timeout"] += 1
                        raise FetchTimeout(f"no origin request slot within {self.cfg.read_timeout:g}s")
                    self.metrics.origin_requests += 1
                    result = await fetch(deadline - t0)
                    self.metrics.fetch_latency.observe(trio.current_time() - t0)
                return result
            except OriginError as exc:
                self.metrics.errors[type(exc).__name__] += 1
                attempt += 1
                delay = random.uniform(0, min(self.cfg.retry_max, self.cfg.retry_base * 2 ** attempt))
                if not is_temp_failure(exc) or trio.current_time() + delay >= deadline:
                    raise
                await trio.sleep(delay)

    async def _from_origin(self, req: Request) -> None:
        body = await self._origin_call(lambda left: self.origin.get_range(
            req.key, req.offset, req.length, timeout=left))
        self.metrics.bytes_by_source["origin"] += len(body)
        parts = split_response(req, body)

        def verify_all() -> list[bytes | IntegrityError]:
            out: list[bytes | IntegrityError] = []
            for loc, stored in zip(req.locs, parts):
                try:
                    # A raw single-chunk body is returned as is: no copy.
                    out.append(verify_chunk(loc, body if len(req.locs) == 1 else stored))
                except IntegrityError as exc:
                    out.append(exc)
            return out

        results = await trio.to_thread.run_sync(verify_all)
        for loc, res in zip(req.locs, results):
            if isinstance(res, IntegrityError):
                self.metrics.errors["integrity"] += 1
                self._finish(loc, None, res)
                continue
            self._finish(loc, res, None)
            if loc.digest not in self._wb_pending:
                try:
                    self._wb_send.send_nowait((loc.digest, res))
                    self._wb_pending.add(loc.digest)
                except trio.WouldBlock:
                    self.metrics.writeback_dropped += 1

    async def _writeback_worker(self) -> None:
        async for digest, data in self._wb_recv:
            try:
                ok = await trio.to_thread.run_sync(self.disk.write, digest, data)
            finally:
                self._wb_pending.discard(digest)
            if ok:
                self.metrics.writeback_done += 1
            else:
                self.metrics.errors["writeback"] += 1



def _runs(items: list[tuple[ChunkLoc, int, _Flight]],
          max_request: int) -> list[list[tuple[ChunkLoc, int, _Flight]]]:
    """Group (chunk, destination offset) items, sorted by offset, into runs that are back to
    back both in one blob and in the destination, of at most `max_request` bytes: each run
    is one ranged GET received straight into place."""
    runs: list[list[tuple[ChunkLoc, int, _Flight]]] = []
    for item in items:
        loc, pos, _ = item
        if runs:
            run = runs[-1]
            last, last_pos, _ = run[-1]
            if (loc.key == last.key and loc.ref.blob == last.ref.blob
                    and loc.ref.offset == last.ref.offset + last.ref.length
                    and pos == last_pos + last.ref.size
                    and sum(i[0].ref.size for i in run) + loc.ref.size <= max_request):
                run.append(item)
                continue
        runs.append([item])
    return runs


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
