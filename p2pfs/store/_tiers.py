"""Where chunks come from, behind one small interface.

    class Tier:
        name: str                                  # "disk", "peer", "origin"
        async def read_into(slots, deadline) -> list[True | False | P2PFSError]

A tier gets the slots the tiers before it could not serve, each a chunk and the
destination it must land in (`slot.dest`: a view of the caller's buffer), and answers per
slot: True (verified bytes are in `dest`; `slot.xxh` set where the bytes are new to this
node and should be written back), False (not here: ask the next tier) or an error (this
chunk cannot be had; only the last tier, the origin, answers that). A tier never leaves a
thread writing into a destination after it returns, because a destination may be a
client's memory. The memory tier sits in front of all of them (a hit needs no slot).
"""

from __future__ import annotations

import random
from typing import Awaitable, Callable, Protocol, Sequence, TypeVar

import trio

from .._buffers import BufferPool
from ..config import FetchConfig
from ..diskcache import DiskCache
from ..errors import FetchTimeout, IntegrityError, OriginError, P2PFSError, is_temp_failure
from ..metrics import Metrics
from ..origin import Origin
from ..plan import ChunkLoc, adjacent, coalesce_items
from ._flights import Flight
from ._verify import place_verified

T = TypeVar("T")
Outcome = bool | P2PFSError


class Slot:
    """One chunk being fetched into `buf[pos:pos + size]` by the owner of `flight`.
    `owned`: the buffer is the store's (shareable, kept in memory, written back from a
    queue); otherwise it is a client's memory (fill), copied only for other readers."""

    __slots__ = ("loc", "buf", "pos", "flight", "owned", "xxh")

    def __init__(self, loc: ChunkLoc, buf: memoryview, pos: int, flight: Flight, owned: bool) -> None:
        self.loc, self.buf, self.pos, self.flight, self.owned = loc, buf, pos, flight, owned
        self.xxh: str | None = None

    @property
    def dest(self) -> memoryview:
        return self.buf[self.pos:self.pos + self.loc.ref.size]

    def follows(self, other: "Slot") -> bool:
        """Whether this slot's destination starts where `other`'s ends."""
        return self.buf is other.buf and self.pos == other.pos + other.loc.ref.size


class Tier(Protocol):
    name: str
    #: True: slots leave this tier one by one (each goes on to the next tier alone).
    per_chunk: bool

    async def read_into(self, slots: Sequence[Slot], deadline: float) -> list[Outcome]: ...


class DiskTier:
    """The local disk cache: files named by sha256 and xxh3, checked on read."""

    name = "disk"
    per_chunk = False

    def __init__(self, disk: DiskCache, metrics: Metrics, *, parallel: int = 8) -> None:
        self.disk = disk
        self.metrics = metrics
        self._limiter = trio.CapacityLimiter(parallel)

    async def read_into(self, slots: Sequence[Slot], deadline: float) -> list[Outcome]:
        out: list[Outcome] = [False] * len(slots)

        async def one(i: int, slot: Slot) -> None:
            loc = slot.loc
            async with self._limiter:
                ok = await trio.to_thread.run_sync(self.disk.read_into, loc.digest, slot.dest,
                                                   loc.spot)
            if ok:  # else a miss; the disk cache counts why (corrupt, read error, raced)
                out[i] = True
                if loc.spot is not None and not self.disk.holds(loc.digest, loc.spot):
                    # Held for another file (or loose): write it into this file's copy too,
                    # so the file becomes whole on disk and can be handed out.
                    slot.xxh = self.disk.xxh_of(loc.digest)
                self.metrics.hits["disk"] += 1
                self.metrics.bytes_by_source["disk"] += slot.loc.ref.size

        todo = [(i, s) for i, s in enumerate(slots) if self.disk.may_hold(s.loc.digest)]
        if len(todo) == 1:
            await one(*todo[0])
        elif todo:
            async with trio.open_nursery() as nursery:
                for i, s in todo:
                    nursery.start_soon(one, i, s)
        return out


class OriginTier:
    """The object store: ranged GETs of coalesced runs (reading through gaps of at most
    `max_gap` stored bytes), retried with full-jitter backoff until the read deadline,
    received straight into the destination where the chunks are raw and back to back both
    in their blob and in their destinations, else into a staging buffer and placed."""

    name = "origin"
    per_chunk = False

    def __init__(self, origin: Origin, cfg: FetchConfig, metrics: Metrics) -> None:
        self.origin = origin
        self.cfg = cfg
        self.metrics = metrics
        self._limiter = trio.CapacityLimiter(cfg.concurrency)
        # Staging for runs that cannot be received in place; enough kept for half the
        # requests in flight at their largest.
        self.staging = BufferPool(keep=max(cfg.max_request, cfg.concurrency * cfg.max_request // 2),
                                  largest=BufferPool.size_class(cfg.max_request))

    async def read_into(self, slots: Sequence[Slot], deadline: float) -> list[Outcome]:
        out: list[Outcome] = [False] * len(slots)
        runs = coalesce_items(list(enumerate(slots)), self.cfg.max_request,
                              loc=lambda item: item[1].loc, max_gap=self.cfg.max_gap)
        if len(runs) == 1:
            await self._run(runs[0], out, deadline)
        else:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(self._run, run, out, deadline)
        return out

    async def _run(self, run: list[tuple[int, Slot]], out: list[Outcome], deadline: float) -> None:
        slots = [s for _, s in run]
        first, last = slots[0].loc, slots[-1].loc
        length = last.ref.offset + last.ref.length - first.ref.offset
        direct = (all(s.loc.ref.compression == "none" for s in slots)
                  and all(b.follows(a) and adjacent(a.loc, b.loc) for a, b in zip(slots, slots[1:])))
        if direct:
            stored, staging = slots[0].buf[slots[0].pos:slots[0].pos + length], None
        else:
            staging, stored = self.staging.take(length)
        try:
            try:
                await self.call(lambda left: self.origin.get_range_into(
                    first.key, first.ref.offset, stored, timeout=left), deadline)
            except P2PFSError as exc:
                for i, _ in run:
                    out[i] = exc
                return
            self.metrics.bytes_by_source["origin"] += length

            def place_all() -> list[str | IntegrityError]:
                results: list[str | IntegrityError] = []
                for s in slots:
                    at = s.loc.ref.offset - first.ref.offset
                    try:
                        results.append(place_verified(s.loc, stored[at:at + s.loc.ref.length], s.dest))
                    except IntegrityError as exc:
                        results.append(exc)
                return results

            results = await trio.to_thread.run_sync(place_all)
        finally:
            # Nothing writes into it once the calls above return (neither a receive nor
            # the placing thread is abandoned on cancellation), so it can be reused.
            if staging is not None:
                self.staging.give(staging)
        for (i, slot), res in zip(run, results):
            if isinstance(res, IntegrityError):
                self.metrics.errors["integrity"] += 1
                out[i] = res
            else:
                slot.xxh = res
                out[i] = True

    async def call(self, fetch: Callable[[float], Awaitable[T]], deadline: float) -> T:
        """Run one origin request under the concurrency limit, retrying transient failures
        with full-jitter backoff until `deadline`. `fetch` gets the seconds left and must
        end by then: a receive into client memory cannot be abandoned, so the bound has to
        reach the socket."""
        attempt = 0
        while True:
            try:
                async with self._limiter:
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
