"""Placing zstd chunks straight into their destination, and the staging buffer pool."""

from __future__ import annotations

import hashlib
import os

import blake3
import pytest
import zstandard

from p2pfs._buffers import BufferPool, is_aligned
from p2pfs.errors import IntegrityError
from p2pfs.manifest import ChunkRef
from p2pfs.plan import ChunkLoc
from p2pfs.store import place_verified


def _loc(plain: bytes, stored: bytes) -> ChunkLoc:
    return ChunkLoc("blob", ChunkRef(blob=0, offset=0, length=len(stored), size=len(plain),
                                     compression="zstd", digest=hashlib.sha256(plain).hexdigest()))


PLAIN = os.urandom(3000) + b"p2pfs " * 20000


def test_a_zstd_chunk_is_inflated_into_its_destination_and_checked():
    stored = zstandard.ZstdCompressor().compress(PLAIN)
    dest = memoryview(bytearray(len(PLAIN)))
    xxh = place_verified(_loc(PLAIN, stored), stored, dest)
    assert bytes(dest) == PLAIN
    assert len(xxh) == 16


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_blake3_chunk_is_checked_by_blake3_and_its_sha256_is_refused(compression):
    stored = PLAIN if compression == "none" else zstandard.ZstdCompressor().compress(PLAIN)

    def loc(hash_: str, digest: str) -> ChunkLoc:
        return ChunkLoc("blob", ChunkRef(0, 0, len(stored), len(PLAIN), compression, digest, hash_))

    dest = memoryview(bytearray(len(PLAIN)))
    place_verified(loc("blake3", blake3.blake3(PLAIN).hexdigest()), stored, dest)
    assert bytes(dest) == PLAIN
    # A digest of the right bytes by the other hash is a mismatch: the ref says how to check.
    with pytest.raises(IntegrityError, match="blake3 mismatch"):
        place_verified(loc("blake3", hashlib.sha256(PLAIN).hexdigest()), stored,
                       memoryview(bytearray(len(PLAIN))))
    bad = bytearray(PLAIN)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match="blake3 mismatch"):
        place_verified(loc("blake3", blake3.blake3(PLAIN).hexdigest()),
                       bytes(bad) if compression == "none" else zstandard.ZstdCompressor().compress(bytes(bad)),
                       memoryview(bytearray(len(PLAIN))))


@pytest.mark.parametrize("case", ["truncated", "longer", "other bytes", "declares other size",
                                  "not zstd"])
def test_a_bad_zstd_chunk_is_refused(case):
    good = zstandard.ZstdCompressor().compress(PLAIN)
    unsized = zstandard.ZstdCompressor(write_content_size=False)
    stored = {
        "truncated": good[:-20],
        # no declared size, and more content than the manifest names (its prefix is right)
        "longer": unsized.compress(PLAIN + b"x" * 100),
        "other bytes": zstandard.ZstdCompressor().compress(PLAIN[::-1]),
        "declares other size": zstandard.ZstdCompressor().compress(PLAIN + b"y"),
        "not zstd": b"\0" * 100,
    }[case]
    dest = memoryview(bytearray(len(PLAIN)))
    with pytest.raises(IntegrityError):
        place_verified(_loc(PLAIN, stored), stored, dest)
    # The thread's decompressor is reused: a frame refused halfway leaves nothing behind
    # for the next chunk.
    other = os.urandom(5000) + b"next " * 1000
    dest = memoryview(bytearray(len(other)))
    compressed = zstandard.ZstdCompressor().compress(other)
    place_verified(_loc(other, compressed), compressed, dest)
    assert bytes(dest) == other


def test_a_frame_declaring_a_huge_size_is_refused_before_it_is_inflated():
    stored = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    dest = memoryview(bytearray(1000))
    with pytest.raises(IntegrityError, match="declares"):
        place_verified(_loc(b"\0" * 1000, stored), stored, dest)


def test_the_pool_hands_a_given_back_buffer_out_again():
    pool = BufferPool(keep=1 << 20, largest=1 << 20)
    buf, view = pool.take(100_000)
    assert len(view) == 100_000 and len(buf) == 128 << 10 and is_aligned(buf)
    pool.give(buf)
    again, view2 = pool.take(70_000)  # same size class
    assert again is buf and len(view2) == 70_000
    small, _ = pool.take(10)
    assert len(small) == BufferPool.MIN and small is not buf


def test_the_pool_keeps_at_most_its_budget_and_never_pools_large_requests():
    pool = BufferPool(keep=256 << 10, largest=256 << 10)
    bufs = [pool.take(200_000)[0] for _ in range(3)]  # 256 KiB each
    for b in bufs:
        pool.give(b)
    assert pool.kept == 256 << 10
    big, view = pool.take(300_000)
    assert len(big) == len(view) == 300_000
    pool.give(big)  # not a size class: dropped
    assert pool.kept == 256 << 10


def test_idle_cpus_are_the_idle_seconds_gained_per_second():
    from p2pfs.store._idle import IdleCpus, proc_stat_idle

    now, idle = [0.0], [100.0]
    cpus = IdleCpus(1.0, read=lambda: idle[0], clock=lambda: now[0])
    assert not cpus.enough()  # one sample: not measured yet, the caller waits a window
    now[0], idle[0] = 0.2, 100.1  # half a CPU idle
    assert not cpus.enough() and cpus.idle == pytest.approx(0.5)
    now[0], idle[0] = 0.25, 100.5  # within the window: the last measurement stands
    assert not cpus.enough()
    now[0], idle[0] = 0.45, 100.6  # 0.5 s idle in the 0.25 s since 0.2: two CPUs
    assert cpus.enough() and cpus.idle == pytest.approx(2.0)
    assert IdleCpus(0, read=lambda: None).enough()
    assert IdleCpus(1.0, read=lambda: None).enough()  # cannot tell: writes go ahead
    assert proc_stat_idle() is None or proc_stat_idle() > 0


def test_prefault_touches_the_heap_it_is_asked_for():
    from p2pfs.daemon import prefault_heap

    assert prefault_heap(8 << 20) == 8 << 20
    assert prefault_heap(3 << 20) == 0  # under one piece: nothing to do
