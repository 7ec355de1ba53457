"""Units: the byte-budget LRU and the content-addressed disk cache (real files, no FUSE)."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from p2pfs.diskcache import DiskCache
from p2pfs.lru import ByteLRU


def test_lru_evicts_least_recent_first_and_respects_keep():
    lru: ByteLRU[str] = ByteLRU(10)
    for k in "abc":
        lru.add(k, 3)
    lru.touch("a")
    lru.add("d", 3)  # 12 > 10
    assert lru.evict(keep="d") == ["b"]
    assert list(lru.keys()) == ["c", "a", "d"] and lru.used == 9
    assert lru.evict(reserve=5) == ["c", "a"]
    assert lru.evict(limit=0, keep="d") == [] and "d" in lru


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 40)), max_size=50))
def test_lru_never_exceeds_budget_after_evict(budget, ops):
    lru: ByteLRU[str] = ByteLRU(budget)
    sizes = {}
    for key, size in ops:
        lru.add(key, size)
        sizes[key] = size
        for v in lru.evict(keep=key):
            del sizes[v]
        assert lru.used == sum(sizes.values())
        assert lru.used <= budget or list(lru.keys()) == [key]


def chunk(i: int, n: int = 1000) -> tuple[str, bytes]:
    data = bytes([i % 256]) * n
    return hashlib.sha256(data).hexdigest(), data


def test_disk_cache_round_trip_and_survives_restart(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    assert c.read(d) is None
    assert c.write(d, data)
    assert c.read(d) == data
    c2 = DiskCache(tmp_path, 10_000)
    c2.scan()
    assert d in c2 and c2.read(d) == data
    assert c2.stats().used_bytes == 1000


def test_disk_cache_evicts_lru_to_stay_in_budget(tmp_path):
    c = DiskCache(tmp_path, 3_500)
    c.scan()
    ds = [chunk(i) for i in range(5)]
    for d, data in ds[:3]:
        c.write(d, data)
    c.read(ds[0][0])  # make chunk 0 recent
    c.write(*ds[3])
    assert ds[1][0] not in c and ds[0][0] in c
    assert c.stats().used_bytes <= 3_500 and c.stats().evicted == 1
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file() and "chunks" in f.parts)
    assert on_disk == c.stats().used_bytes
    # A smaller budget after a restart is enforced at scan time, oldest first.
    c2 = DiskCache(tmp_path, 1_000)
    c2.scan()
    assert c2.stats().chunks == 1 and c2.stats().used_bytes <= 1_000


def test_corrupt_cache_file_is_dropped_not_served(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(7)
    c.write(d, data)
    (f,) = [p for p in tmp_path.rglob(f"{d}.*")]
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert c.read(d) is None
    assert not f.exists() and d not in c and c.stats().corrupt_dropped == 1


def test_scan_removes_temp_and_foreign_files(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    sub = tmp_path / "chunks" / "ab"
    sub.mkdir()
    (sub / ".tmp.abc.1").write_bytes(b"x")
    (sub / "garbage").write_bytes(b"x")
    c.scan()
    assert list(sub.iterdir()) == []


def test_chunk_bigger_than_budget_is_not_stored(tmp_path):
    c = DiskCache(tmp_path, 100)
    c.scan()
    d, data = chunk(3, 1000)
    assert c.write(d, data) is False and d not in c


def test_write_errors_are_reported_not_raised(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(9)
    (tmp_path / "chunks" / d[:2]).write_bytes(b"a file where a directory should be")
    assert c.write(d, data) is False
    assert c.stats().write_errors == 1 and d not in c


@pytest.mark.parametrize("size", [2 * 4096, 3 * 4096 + 123, 100])
def test_aligned_buffers_round_trip_through_direct_io(tmp_path, size):
    """Page-aligned buffers take the O_DIRECT paths (bulk direct, tail buffered); whatever
    the filesystem allows, the bytes read back are the bytes written."""
    import mmap
    from p2pfs._buffers import is_aligned

    src = mmap.mmap(-1, size)
    src[:] = os.urandom(size)
    assert is_aligned(src)
    digest = hashlib.sha256(src).hexdigest()
    c = DiskCache(tmp_path, 1 << 20)
    c.scan()
    assert c.write(digest, memoryview(src))
    assert c.read(digest) == src[:]
    dest = mmap.mmap(-1, size)
    assert c.read_into(digest, memoryview(dest)) and dest[:] == src[:]
    plain = bytearray(size)
    assert c.read_into(digest, memoryview(plain)) and plain == src[:]
    assert not c.read_into(digest, memoryview(bytearray(size + 1)))  # wrong size: refused
    assert not c.read_into("0" * 64, memoryview(plain))  # absent
