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


# -- the budget holds at every step (issue 12, defect 11) ---------------------------------

@settings(max_examples=300, deadline=None)
@given(st.integers(0, 60), st.lists(st.tuples(
    st.sampled_from(["reserve", "commit", "release", "evict_held", "remove_held", "gone", "touch"]),
    st.sampled_from("abcdef"), st.integers(0, 30)), max_size=60))
def test_lru_used_plus_reserved_never_exceeds_budget(budget, ops):
    """Reservations (files being written) and held bytes (files being deleted) count against
    the budget until they are committed or released: used + reserved <= budget always."""
    lru: ByteLRU[str] = ByteLRU(budget)
    writing: list[tuple[str, int]] = []  # reservations of files being written
    held: list[int] = []                 # bytes of files being deleted
    for op, key, size in ops:
        if op == "reserve":
            if lru.reserve(size):
                writing.append((key, size))
            else:
                before = lru.reserved
                lru.evict(reserve=lru.reserved + size, hold=True)
                held.append(lru.reserved - before)
        elif op == "commit" and writing:
            k, n = writing.pop(0)
            old = lru.remove(k, hold=True)  # as DiskCache does when a write of k landed twice
            lru.commit(k, n)
            held.append(old)
        elif op == "release" and writing:
            lru.release(writing.pop()[1])
        elif op == "evict_held":
            before = lru.reserved
            lru.evict(limit=size, hold=True)
            held.append(lru.reserved - before)
        elif op == "remove_held":
            held.append(lru.remove(key, hold=True))
        elif op == "gone" and held:
            lru.release(held.pop(0))
        elif op == "touch":
            lru.touch(key)
        assert lru.used + lru.reserved <= budget
        assert lru.reserved == sum(n for _, n in writing) + sum(held)
        assert lru.used == sum(lru.size(k) for k in lru.keys())


def test_lru_release_of_more_than_reserved_is_a_bug():
    lru: ByteLRU[str] = ByteLRU(10)
    assert lru.reserve(4) and not lru.reserve(7)
    with pytest.raises(ValueError):
        lru.release(5)


def same_prefix_chunks(count: int, size: int, prefix: str | None = None) -> list[tuple[str, bytes]]:
    """`count` distinct chunks whose digests share their first two hex digits, so they live
    in one directory of the cache and one scandir sees all of them at one instant."""
    out: list[tuple[str, bytes]] = []
    i = 0
    while len(out) < count:
        data = i.to_bytes(8, "little") * (size // 8)
        d = hashlib.sha256(data).hexdigest()
        if prefix is None:
            prefix = d[:2]
        if d[:2] == prefix:
            out.append((d, data))
        i += 1
    return out


def bytes_on_disk(directory) -> int:
    """Sizes of the regular files in one directory (temp files included): the names from
    one scandir, so a file removed before a later one appeared is never counted with it."""
    total = 0
    for e in list(os.scandir(directory)):
        try:
            total += e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


def watch_renames(monkeypatch, measure):
    """Measure just before and just after every real rename (where a chunk file appears)."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        measure()
        real(src, dst, *args, **kwargs)
        measure()

    monkeypatch.setattr(os, "rename", rename)


def test_usage_never_exceeds_the_budget_not_even_during_a_write(tmp_path, monkeypatch):
    """Budget 3 chunks, 10 writes: the chunk files on disk (temp files included) and the
    index stay within the budget at every step; before the fix the 4th chunk was renamed
    into place before the oldest was evicted (4 chunks on disk)."""
    size = 4096 + 104
    chunks = same_prefix_chunks(10, size)
    budget = 3 * size
    c = DiskCache(tmp_path, budget)
    c.scan()
    sub = tmp_path / "chunks" / chunks[0][0][:2]
    seen: list[tuple[int, int]] = []

    def measure():
        seen.append((bytes_on_disk(sub) if sub.exists() else 0, c.stats().used_bytes))

    watch_renames(monkeypatch, measure)
    for d, data in chunks:
        assert c.write(d, data)
        measure()
    assert len(seen) == 30
    assert max(disk for disk, _ in seen) <= budget, seen
    assert max(used for _, used in seen) <= budget, seen
    assert seen[-1] == (budget, budget) and c.stats().evicted == 7
    assert [d for d, _ in chunks[-3:]] == [d for d, _ in chunks if d in c]


def test_concurrent_writes_stay_within_the_budget(tmp_path, monkeypatch):
    """Four threads writing 12 chunks each into a budget of 3: the room a write needs is
    made and held before its file exists, so no instant sees more than the budget."""
    import threading

    size = 2 * 4096
    chunks = same_prefix_chunks(48, size)
    budget = 3 * size
    c = DiskCache(tmp_path, budget)
    c.scan()
    sub = tmp_path / "chunks" / chunks[0][0][:2]
    sub.mkdir()
    peak = [0]
    stop = threading.Event()

    def measure():
        peak[0] = max(peak[0], bytes_on_disk(sub))

    def poll():
        while not stop.is_set():
            measure()

    watch_renames(monkeypatch, measure)
    poller = threading.Thread(target=poll)
    poller.start()
    results: list[bool] = []
    try:
        writers = [threading.Thread(target=lambda part=chunks[k::4]: results.extend(
            c.write(d, data) for d, data in part)) for k in range(4)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(30)
    finally:
        stop.set()
        poller.join()
    assert results == [True] * 48
    assert 0 < peak[0] <= budget
    s = c.stats()
    assert s.used_bytes == bytes_on_disk(sub) == budget and s.chunks == 3 and s.evicted == 45


# -- misses, by why (issue 12, defect 11) -------------------------------------------------

def _chunk_file(tmp_path, digest):
    (f,) = (tmp_path / "chunks" / digest[:2]).glob(f"{digest}.*")
    return f


def _on_open(monkeypatch, path, action):
    """Run `action` once, right before the cache opens `path` (between lookup and read)."""
    real = os.open
    fired = []

    def spy(p, *args, **kwargs):
        if os.fspath(p) == os.fspath(path) and not fired:
            fired.append(p)
            action()
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return fired


def test_chunk_evicted_between_lookup_and_read_is_a_plain_miss(tmp_path, monkeypatch):
    c = DiskCache(tmp_path, 2_000)
    c.scan()
    (d, data), (d2, data2) = chunk(1), chunk(2)
    c.write(d, data)
    fired = _on_open(monkeypatch, _chunk_file(tmp_path, d), lambda: c.write(d2, data2 + data2))
    assert c.read(d) is None and fired  # evicted (d2 needs the whole budget) as it was opened
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.read_errors, s.evicted) == (1, 0, 0, 1)
    assert d not in c and d2 in c and s.used_bytes == 2_000


def test_a_newer_entry_survives_a_read_that_raced_with_its_predecessor(tmp_path, monkeypatch):
    """Evicted and written again under another xxh3 (a fill client's memory changed) while a
    reader had located the old file: the reader's ENOENT must not drop the new entry, whose
    file would then stay on disk uncounted (before the fix it did)."""
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    c.write(d, data)

    def replace():
        c.remove(d)
        c.write(d, data, xxh="0123456789abcdef")

    _on_open(monkeypatch, _chunk_file(tmp_path, d), replace)
    assert c.read_into(d, memoryview(bytearray(len(data)))) is False
    assert d in c and c.stats().raced == 1 and c.stats().corrupt_dropped == 0
    on_disk = sum(f.stat().st_size for f in (tmp_path / "chunks").rglob("*") if f.is_file())
    assert on_disk == c.stats().used_bytes == len(data)


def test_a_chunk_file_removed_behind_our_back_is_forgotten(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    c.write(d, data)
    _chunk_file(tmp_path, d).unlink()
    assert c.read(d) is None and d not in c
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.used_bytes) == (1, 0, 0)


def test_unreadable_chunk_paths_are_dropped_and_logged_once(tmp_path, caplog):
    """An OSError other than ENOENT (here ENOTDIR: a file where the chunk's directory was)
    drops the chunk and counts a read error; before the fix it stayed in the index and
    every read failed again."""
    import shutil

    c = DiskCache(tmp_path, 100_000)
    c.scan()
    (d1, x1), (d2, x2) = same_prefix_chunks(2, 1000)
    c.write(d1, x1)
    c.write(d2, x2)
    sub = tmp_path / "chunks" / d1[:2]
    shutil.rmtree(sub)
    sub.write_bytes(b"not a directory")
    with caplog.at_level("DEBUG", logger="p2pfs.diskcache"):
        assert c.read(d1) is None and c.read(d2) is None
    assert d1 not in c and d2 not in c
    s = c.stats()
    assert (s.read_errors, s.corrupt_dropped, s.raced, s.used_bytes, s.chunks) == (2, 0, 0, 0, 0)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "unreadable" in warnings[0].getMessage()


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "symlink-loop"])
def test_non_regular_files_at_chunk_paths_are_dropped(tmp_path, kind):
    """A FIFO (before the fix the read blocked forever), a directory, or a symlink (even to
    the right bytes) where a chunk file should be: dropped as corrupt, removed, a miss."""
    import threading

    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(5)
    c.write(d, data)
    f = _chunk_file(tmp_path, d)
    f.unlink()
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "directory":
        f.mkdir()
        (f / "x").write_bytes(data)
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(data)
        f.symlink_to(tmp_path / "elsewhere")
    else:
        f.symlink_to(f.name)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(c.read(d)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the old code's open of the FIFO before failing
        os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail(f"reading a chunk path that is a {kind} blocked")
    assert got == [None] and d not in c
    assert not os.path.lexists(f)
    s = c.stats()
    assert (s.corrupt_dropped, s.read_errors, s.raced, s.used_bytes) == (1, 0, 0, 0)
    assert c.write(d, data) and c.read(d) == data  # the path is usable again


def test_scan_indexes_only_regular_files(tmp_path):
    """Special files with a chunk's name are removed at scan, as are directories and files
    we did not write (before the fix a directory there stopped the scan with EISDIR)."""
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    c.write(d, data)
    good = _chunk_file(tmp_path, d)
    sub = good.parent
    fake = [sub / (d[:2] + "1" * 62 + "." + "2" * 16), sub / (d[:2] + "3" * 62 + "." + "4" * 16)]
    fake[0].mkdir()
    os.mkfifo(fake[1])
    (sub / "garbage-dir").mkdir()
    (tmp_path / "chunks" / "zz").mkdir()
    (tmp_path / "chunks" / "zz" / (d + "." + "5" * 16)).write_bytes(data)  # wrong directory
    c2 = DiskCache(tmp_path, 10_000)
    c2.scan()
    assert sorted(p.name for p in sub.iterdir()) == [good.name]
    assert list((tmp_path / "chunks" / "zz").iterdir()) == []
    assert c2.stats().chunks == 1 and c2.read(d) == data


def test_enospc_evicts_and_later_writes_succeed(tmp_path):
    """A disk that fills before the budget does (a 1 MiB tmpfs, a 64 MiB budget): the write
    that hit ENOSPC fails cleanly, frees room, and the next writes are stored."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs root to mount a 1 MiB tmpfs: {r.stderr.strip()}")
    try:
        c = DiskCache(mnt, 64 << 20)
        c.scan()
        chunks = [chunk(i, 300_000) for i in range(8)]
        results = [c.write(d, data) for d, data in chunks]
        assert results[:3] == [True] * 3 and False in results
        s = c.stats()
        assert s.write_errors >= 1 and s.evicted >= 1
        assert results[results.index(False) + 1] is True  # room was made
        assert c._lru.reserved == 0  # nothing left held
        for d, data in chunks:
            assert d not in c or c.read(d) == data
        assert not [p for p in mnt.rglob(".tmp*")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
