"""The chunk store over a real local-directory origin, with thin wrappers at the origin
interface to count, stall or corrupt requests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from p2pfs._buffers import aligned_empty
from p2pfs.store import ChunkStore
from p2pfs.config import CacheConfig, FetchConfig
from p2pfs.diskcache import DiskCache
from p2pfs.errors import (FetchTimeout, IntegrityError, InternalError, ObjectTruncated, OriginError,
                          OriginUnavailable, RecentlyFailed)
from p2pfs.manifest import ChunkRef
from p2pfs.metrics import Metrics
from p2pfs.origin import LocalDirOrigin
from p2pfs.plan import ChunkLoc

CHUNK = 64 * 1024


class Counting(LocalDirOrigin):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.requests: list[tuple[int, int]] = []
        self.stall = False
        self.down = False
        self.corrupt = False

    async def get_range(self, key: str, offset: int, length: int, *, timeout=None) -> bytes:
        self.requests.append((offset, length))
        if self.down:
            raise OriginUnavailable("store is down")
        if self.stall:
            await trio.sleep_forever()
        data = await super().get_range(key, offset, length)
        return b"X" + data[1:] if self.corrupt else data

    async def get_range_into(self, key: str, offset: int, dest: memoryview, *, timeout=None) -> None:
        self.requests.append((offset, len(dest)))
        if self.down:
            raise OriginUnavailable("store is down")
        if self.stall:
            await trio.sleep_forever()
        await super().get_range_into(key, offset, dest)
        if self.corrupt:
            dest[0] ^= 0xFF


def blob(tmp_path: Path, size: int = 10 * CHUNK) -> tuple[bytes, list[ChunkLoc]]:
    data = os.urandom(size)
    (tmp_path / "origin").mkdir(exist_ok=True)
    (tmp_path / "origin" / "blob").write_bytes(data)
    locs = [ChunkLoc("blob", ChunkRef(0, o, len(data[o:o + CHUNK]), len(data[o:o + CHUNK]), "none",
                                      hashlib.sha256(data[o:o + CHUNK]).hexdigest()))
            for o in range(0, size, CHUNK)]
    return data, locs


def make_store(tmp_path: Path, origin, **fetch) -> ChunkStore:
    disk = DiskCache(tmp_path / "cache", 1 << 30)
    disk.scan()
    cfg = dict(max_request=4 * CHUNK, read_timeout=2.0, retry_base=0.01, retry_max=0.05)
    cfg.update(fetch)
    return ChunkStore(origin, disk, fetch=FetchConfig(**cfg),
                      cache=CacheConfig(memory_size=3 * CHUNK, writeback_queue=64),
                      metrics=Metrics())


def forget_memory(store: ChunkStore) -> None:
    """Empty the store's memory tier, so the next read goes to disk or the origin."""
    store.memory.clear()


async def with_store(store: ChunkStore, fn) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await fn()
        nursery.cancel_scope.cancel()


async def test_single_flight_and_coalescing(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)

    async def body():
        results = {}

        async def reader(i):
            results[i] = await store.get(locs[:8])

        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(reader, i)
        for r in results.values():
            assert b"".join(r) == data[:8 * CHUNK]
        # 10 readers, 8 chunks, at most 4 chunks per request: exactly 2 requests.
        assert sorted(origin.requests) == [(0, 4 * CHUNK), (4 * CHUNK, 4 * CHUNK)]

    await with_store(store, body)
    assert store.metrics.misses == 8


async def test_one_get_reads_through_a_small_gap_and_drops_its_bytes(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin, max_gap=CHUNK)

    async def body():
        # Chunks 0, 2 and 5: one chunk between the first two (read through), two between
        # the next (a second GET). The gap's bytes are never served or kept.
        got = await store.get([locs[0], locs[2], locs[5]])
        assert [bytes(g) for g in got] == [data[0:CHUNK], data[2 * CHUNK:3 * CHUNK],
                                           data[5 * CHUNK:6 * CHUNK]]
        assert sorted(origin.requests) == [(0, 3 * CHUNK), (5 * CHUNK, CHUNK)]
        assert locs[1].digest not in store.memory
        assert store.metrics.bytes_by_source["origin"] == 4 * CHUNK
        # Raw chunks with a gap are not received in place: a fill gets exactly its chunks.
        origin.requests.clear()
        forget_memory(store)
        dest = aligned_empty(2 * CHUNK)
        await store.fill([locs[6], locs[8]], memoryview(dest))
        assert bytes(dest) == data[6 * CHUNK:7 * CHUNK] + data[8 * CHUNK:9 * CHUNK]
        assert origin.requests == [(6 * CHUNK, 3 * CHUNK)]

    await with_store(store, body)


async def test_write_back_then_served_from_disk_without_origin(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)

    async def body():
        await store.warm(locs)
        assert all(l.digest in store.disk for l in locs)
        origin.down = True
        forget_memory(store)
        got = await store.get(locs)
        assert b"".join(got) == data

    await with_store(store, body)
    assert store.metrics.hits["disk"] == len(locs)


async def test_unreachable_origin_fails_within_the_deadline_then_recovers(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin, read_timeout=1.0, fail_fast=0.5)

    async def body():
        origin.down = True
        t0 = trio.current_time()
        with pytest.raises((OriginUnavailable, FetchTimeout)):
            await store.get(locs[:1])
        assert trio.current_time() - t0 <= 1.5
        assert len(origin.requests) > 1  # it retried
        origin.down = False
        # The kernel re-issues a failed read at once: that retry fails fast, without
        # waiting a second read deadline and without asking the store.
        asked = len(origin.requests)
        t0 = trio.current_time()
        with pytest.raises(RecentlyFailed):
            await store.get(locs[:1])
        assert trio.current_time() - t0 < 0.1 and len(origin.requests) == asked
        await trio.sleep(0.5)
        assert (await store.get(locs[:1]))[0] == data[:CHUNK]

    await with_store(store, body)


async def test_stalled_origin_gives_fetch_timeout(tmp_path):
    _, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)

    async def body():
        origin.stall = True
        with pytest.raises(FetchTimeout):
            await store.get(locs[:1], timeout=0.3)

    await with_store(store, body)


async def test_bad_bytes_from_origin_are_never_served(tmp_path):
    _, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    origin.corrupt = True
    store = make_store(tmp_path, origin)

    async def body():
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            await store.get(locs[:1])
        assert locs[0].digest not in store.disk and locs[0].digest not in store.memory

    await with_store(store, body)
    assert store.metrics.errors["integrity"] == 1


async def test_zstd_chunks_are_decompressed_and_verified(tmp_path):
    import zstandard

    raw = b"layer bytes " * 5000
    packed = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "origin").mkdir()
    (tmp_path / "origin" / "pack").write_bytes(b"pad" + packed)
    loc = ChunkLoc("pack", ChunkRef(0, 3, len(packed), len(raw), "zstd", hashlib.sha256(raw).hexdigest()))
    store = make_store(tmp_path, Counting(tmp_path / "origin"))

    async def body():
        assert (await store.get([loc]))[0] == raw

    await with_store(store, body)


async def test_warm_reports_what_the_cache_cannot_keep(tmp_path):
    from p2pfs.errors import CacheFull

    _, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    store.disk = DiskCache(tmp_path / "small", 3 * CHUNK)
    store.disk.scan()

    async def body():
        with pytest.raises(CacheFull, match="raise --cache-size"):
            await store.warm(locs)
        assert store.disk.stats().used_bytes <= 3 * CHUNK

    await with_store(store, body)


async def test_fill_receives_into_the_callers_memory_and_shares_flights(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    dest = bytearray(len(data))

    async def body():
        got = {}

        async def reader():
            got["r"] = await store.get(locs[2:5])

        async with trio.open_nursery() as n:
            n.start_soon(store.fill, locs, memoryview(dest))
            n.start_soon(reader)
        assert dest == data
        assert b"".join(got["r"]) == data[2 * CHUNK:5 * CHUNK]
        # Every chunk crossed the network once, whoever asked first.
        assert sum(length for _, length in origin.requests) == len(data)
        # What the fill fetched is on disk when it returns (the caller's memory may change).
        assert all(loc.digest in store.disk for loc in locs[5:])
        await store.warm(locs)  # the reader's chunks go through the write-back queue
        origin.down = True
        again = bytearray(len(data))
        forget_memory(store)
        await store.fill(locs, memoryview(again))
        assert again == data

    await with_store(store, body)
    assert store.metrics.hits["disk"] == len(locs)


async def test_fill_of_corrupt_origin_data_fails_and_keeps_nothing(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    origin.corrupt = True

    async def body():
        with pytest.raises(IntegrityError):
            await store.fill(locs[:4], memoryview(bytearray(4 * CHUNK)))
        # One GET for the 4 chunks; only its first byte (chunk 0) was bad: chunk 0 is not
        # kept, the three verified ones are.
        assert origin.requests == [(0, 4 * CHUNK)]
        assert [loc.digest in store.disk for loc in locs[:4]] == [False, True, True, True]
        assert store.in_flight == 0
        origin.corrupt = False
        dest = bytearray(4 * CHUNK)
        await store.fill(locs[:4], memoryview(dest))
        assert dest == data[:4 * CHUNK]

    await with_store(store, body)
    assert store.metrics.errors["integrity"] >= 1


async def test_fill_from_a_stalled_origin_leaves_no_waiter_hanging(tmp_path):
    _, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    origin.stall = True

    async def body():
        async with trio.open_nursery() as n:
            n.start_soon(store.fill, locs[:2], memoryview(bytearray(2 * CHUNK)))
            await trio.sleep(0.05)
            with pytest.raises(FetchTimeout):  # a reader waiting on the fill's flight
                await store.get(locs[:1], timeout=0.3)
            n.cancel_scope.cancel()  # the fill's owner goes away: its flights must end
        assert store.in_flight == 0

    await with_store(store, body)


async def test_fill_rejects_a_destination_of_the_wrong_size(tmp_path):
    _, locs = blob(tmp_path)
    store = make_store(tmp_path, Counting(tmp_path / "origin"))

    async def body():
        with pytest.raises(ValueError, match="destination"):
            await store.fill(locs[:2], memoryview(bytearray(CHUNK)))
        assert store.in_flight == 0

    await with_store(store, body)


async def test_fill_with_deferred_writes_keeps_memory_changed_after_the_answer_out(tmp_path):
    """With `writes`, a fill answers before the disk write; if the caller changes its
    memory before that write, the cache file fails its xxh3 on read-back and the chunk is
    refetched, never served changed."""
    import threading

    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    gate = threading.Event()
    write = store.disk.write

    def gated_write(*args, **kw):
        gate.wait(10)
        return write(*args, **kw)

    store.disk.write = gated_write
    dest = bytearray(2 * CHUNK)

    async def body():
        async with trio.open_nursery() as writes:
            await store.fill(locs[:2], memoryview(dest), writes=writes)
            assert dest == data[:2 * CHUNK]  # answered while both writes wait at the gate
            assert store.writeback_pending == 2
            dest[:CHUNK] = bytes(CHUNK)  # the caller reuses chunk 0's memory at once
            gate.set()
        assert store.writeback_pending == 0
        assert locs[0].digest in store.disk and locs[1].digest in store.disk
        forget_memory(store)
        origin.requests.clear()
        got = await store.get(locs[:2])
        assert b"".join(got) == data[:2 * CHUNK]
        assert origin.requests == [(0, CHUNK)]  # chunk 0 refetched, chunk 1 from disk

    await with_store(store, body)
    assert store.disk.stats().corrupt_dropped == 1 and store.metrics.hits["disk"] == 1


async def test_a_stalled_read_and_its_kernel_retry_fail_within_one_deadline(tmp_path):
    """Defect 7 of issue 12: the kernel retries a failed read-ahead synchronously (an mmap
    fault twice); each retry used to wait a whole read_timeout again."""
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin, read_timeout=0.5, fail_fast=30.0)

    async def body():
        origin.stall = True
        t0 = trio.current_time()
        for _ in range(3):  # the read, then two retries of the same pages
            with pytest.raises((FetchTimeout, RecentlyFailed)):
                await store.get(locs[2:4])
        assert trio.current_time() - t0 < 0.5 + 0.3
        assert store.metrics.errors["fail_fast"] == 2
        # A chunk that did not fail is not affected, and a success clears the entry.
        origin.stall = False
        assert (await store.get(locs[5:6]))[0] == data[5 * CHUNK:6 * CHUNK]

    await with_store(store, body)


async def test_a_chunk_range_past_the_blob_end_fails_at_once(tmp_path):
    """Defect 9: a short body is permanent for that manifest, not an outage to retry."""
    data, locs = blob(tmp_path)
    (tmp_path / "origin" / "blob").write_bytes(data[:-CHUNK // 2])  # the blob shrank
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin, read_timeout=5.0)

    async def body():
        t0 = trio.current_time()
        with pytest.raises(ObjectTruncated):
            await store.get(locs[-1:])
        assert trio.current_time() - t0 < 0.5
        assert len(origin.requests) == 1  # not retried
        assert (await store.get(locs[:1]))[0] == data[:CHUNK]

    await with_store(store, body)


async def test_a_zstd_bomb_is_refused_before_it_is_inflated(tmp_path):
    """Defect 3: zstd allocates what a frame declares; a 32 KB frame declaring 1 GiB took
    the daemon's memory with it. The declaration is checked against the manifest first."""
    import tracemalloc

    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 30))
    (tmp_path / "origin").mkdir()
    (tmp_path / "origin" / "blob").write_bytes(bomb)
    loc = ChunkLoc("blob", ChunkRef(0, 0, len(bomb), CHUNK, "zstd", hashlib.sha256(bytes(CHUNK)).hexdigest()))
    store = make_store(tmp_path, Counting(tmp_path / "origin"))

    async def body():
        tracemalloc.start()
        try:
            with pytest.raises(IntegrityError, match="declares"):
                await store.get([loc])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, peak

    await with_store(store, body)


async def test_a_disk_read_racing_an_eviction_is_a_miss_not_corruption(tmp_path):
    """Defect 11: a chunk evicted between `digest in disk` and the read was counted as
    corruption; it is a plain miss (the disk cache counts misses by cause)."""
    data, locs = blob(tmp_path, 2 * CHUNK)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    for loc in locs:
        assert store.disk.write(loc.digest, data[loc.ref.offset:loc.ref.offset + loc.ref.size])
    read, read_into = store.disk.read, store.disk.read_into

    def evicted_first(digest, *args):  # evicted after `digest in disk`, before the read
        store.disk.remove(digest)
        return (read_into if args else read)(digest, *args)

    store.disk.read = store.disk.read_into = evicted_first

    async def body():
        assert b"".join(await store.get(locs[:1])) == data[:CHUNK]
        dest = bytearray(CHUNK)
        await store.fill(locs[1:2], memoryview(dest))
        assert dest == data[CHUNK:2 * CHUNK]

    await with_store(store, body)
    assert store.metrics.errors["cache_corrupt"] == 0
    assert store.disk.stats().corrupt_dropped == 0


async def test_a_bug_of_ours_is_an_internal_error_not_the_stores(tmp_path, caplog):
    """A bug in the fetch path was reported as an OriginError (blaming the store, and later
    a peer) without a log line; it is an InternalError with one traceback."""
    _, locs = blob(tmp_path)

    class Buggy(Counting):
        async def get_range(self, key, offset, length, *, timeout=None):
            raise RuntimeError("a bug")

        async def get_range_into(self, key, offset, dest, *, timeout=None):
            raise RuntimeError("a bug")

    store = make_store(tmp_path, Buggy(tmp_path / "origin"))

    async def body():
        with pytest.raises(InternalError) as exc:
            await store.get(locs[:1])
        assert not isinstance(exc.value, OriginError)

    with caplog.at_level("ERROR", logger="p2pfs.store"):
        await with_store(store, body)
    assert store.metrics.errors["internal"] == 1
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


def _gated_store(tmp_path: Path, origin, idle: list, **cache) -> ChunkStore:
    """A store whose write-back sees `idle[0]` idle CPUs (a fake /proc/stat reading)."""
    from p2pfs.store._idle import IdleCpus

    disk = DiskCache(tmp_path / "cache", 1 << 30)
    disk.scan()
    store = ChunkStore(origin, disk, fetch=FetchConfig(max_request=4 * CHUNK, read_timeout=2.0),
                       cache=CacheConfig(memory_size=3 * CHUNK, **cache), metrics=Metrics())
    total = [0.0]

    def read() -> float:
        total[0] += idle[0] * IdleCpus.WINDOW
        return total[0]

    store._idle = IdleCpus(1.0, read=read, clock=_StepClock(IdleCpus.WINDOW))
    return store


class _StepClock:
    """Each reading one window later than the last (so every check takes a sample)."""

    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


async def test_write_back_waits_for_idle_cpu_and_goes_once_there_is_some(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    idle = [0.2]  # a busy machine: a fifth of a CPU idle
    store = _gated_store(tmp_path, origin, idle, writeback_bytes=64 * CHUNK)

    async def body():
        assert b"".join(await store.get(locs[:4])) == data[:4 * CHUNK]
        await trio.sleep(0.5)
        assert store.writeback_pending == 4 and store.metrics.writeback_done == 0
        idle[0] = 1.5
        with trio.fail_after(5):
            while store.writeback_pending:
                await trio.sleep(0.05)
        assert store.metrics.writeback_done == 4 and all(loc.digest in store.disk for loc in locs[:4])

    await with_store(store, body)


async def test_a_half_full_write_back_queue_goes_on_a_busy_machine_and_a_full_one_drops(tmp_path):
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = _gated_store(tmp_path, origin, [0.0], writeback_bytes=4 * CHUNK, writeback_workers=1)

    async def body():
        # 10 chunks read into a queue of 4 chunks' bytes: some are dropped, and what is
        # queued is written while the queue is half full, although no CPU is idle.
        assert b"".join(await store.get(locs)) == data
        with trio.fail_after(5):
            while store.writeback_pending > 1:
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        dropped = store.metrics.writeback_dropped
        assert dropped > 0
        # the last one is under half full: it waits for idle CPU
        assert store.writeback_pending == 1
        assert store.metrics.writeback_done == len(locs) - dropped - 1

    await with_store(store, body)


def test_a_fresh_cache_has_every_subdirectory_and_a_removed_one_comes_back(tmp_path):
    disk = DiskCache(tmp_path / "cache", 1 << 30)
    disk.scan()
    subs = sorted(p.name for p in (tmp_path / "cache" / "files").iterdir())
    assert subs == [f"{i:02x}" for i in range(256)]
    data = os.urandom(CHUNK)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "cache" / "files" / digest[:2]).rmdir()
    assert disk.write(digest, data)
    assert disk.read(digest) == data


async def test_write_back_on_a_machine_that_stays_busy_waits_a_bounded_time(tmp_path, monkeypatch):
    from p2pfs.store import _store

    monkeypatch.setattr(_store, "WRITEBACK_MAX_DEFER_S", 0.6)
    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = _gated_store(tmp_path, origin, [0.0], writeback_bytes=64 * CHUNK)

    async def body():
        assert b"".join(await store.get(locs[:2])) == data[:2 * CHUNK]
        await trio.sleep(0.2)
        assert store.metrics.writeback_done == 0  # no idle CPU: waiting
        with trio.fail_after(5):
            while store.writeback_pending:
                await trio.sleep(0.05)
        assert store.metrics.writeback_done == 2

    await with_store(store, body)


async def test_a_chunk_a_fill_is_writing_to_disk_is_not_fetched_again(tmp_path):
    # A fill's chunk lands in its client's memory, not the memory tier, and its flight ends
    # before its disk write does. A reader in that window waits for the write and reads the
    # disk: the bytes cross the network once (this raced in a full-suite run before).
    import threading

    data, locs = blob(tmp_path)
    origin = Counting(tmp_path / "origin")
    store = make_store(tmp_path, origin)
    write, release = store.disk.write, threading.Event()

    def slow_write(*args, **kwargs):
        release.wait(10)
        return write(*args, **kwargs)

    store.disk.write = slow_write  # type: ignore[method-assign]
    client = aligned_empty(CHUNK)

    async def body():
        async with trio.open_nursery() as writes:
            await store.fill(locs[:1], client, writes=writes)  # answered; its write is held
            assert bytes(client) == data[:CHUNK] and len(origin.requests) == 1

            async def let_the_write_go():
                await trio.sleep(0.3)
                release.set()
            writes.start_soon(let_the_write_go)
            with trio.fail_after(5):
                (got,) = await store.get(locs[:1])
            assert bytes(got) == data[:CHUNK]
            assert len(origin.requests) == 1, "fetched again while the fill's write was under way"
            assert store.metrics.hits["disk"] == 1

    await with_store(store, body)
