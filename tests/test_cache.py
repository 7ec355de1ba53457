"""Units: the byte-budget LRU and the content-addressed disk cache (real files, no FUSE)."""

from __future__ import annotations

import hashlib
import os

from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from p2pfs.diskcache import DiskCache
from p2pfs.lru import ByteLRU
from p2pfs.plan import Spot


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


def data_file(root: Path, fid: str) -> Path:
    """The data file of content id `fid` (a loose chunk's: its digest) in a cache dir."""
    return root / "files" / fid[:2] / fid


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "files").glob("*/*") if p.is_file())


def allocated(path: Path) -> int:
    """Bytes a file holds on disk (its allocated blocks: holes count nothing), or the sum
    over the regular files of a directory tree."""
    if path.is_dir():
        return sum(allocated(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_blocks * 512


def index_records(root: Path) -> list[list[str]]:
    return [line.split() for line in (root / "index").read_text().splitlines()]


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
    # Loose chunks: one data file each, of exactly the chunk's size; the evicted one is gone.
    files = data_files(tmp_path)
    assert [f.name for f in files] == sorted(d for d, _ in ds[:4] if d in c)
    assert sum(f.stat().st_size for f in files) == c.stats().used_bytes
    # A smaller budget after a restart is enforced at scan time, oldest first.
    c.close()
    c2 = DiskCache(tmp_path, 1_000)
    c2.scan()
    assert c2.stats().chunks == 1 and c2.stats().used_bytes <= 1_000
    assert len(data_files(tmp_path)) == 1 and len(index_records(tmp_path)) == 1


def test_corrupt_cache_file_is_dropped_not_served(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(7)
    c.write(d, data)
    f = data_file(tmp_path, d)
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert c.read(d) is None
    assert not f.exists() and d not in c and c.stats().corrupt_dropped == 1


def test_a_corrupt_chunk_in_a_file_is_punched_out_its_neighbours_kept(tmp_path):
    """A chunk of a multi-chunk data file that fails its xxh3 is dropped alone (its hole
    punched: the disk no longer holds it), the file's other chunks are still served."""
    size = 2 * 4096
    chunks = same_prefix_chunks(3, size)
    fid = hashlib.sha256(b"a file").hexdigest()
    c = DiskCache(tmp_path, 1 << 20)
    c.scan()
    for i, (d, data) in enumerate(chunks):
        assert c.write(d, data, spot=Spot(fid, i * size, 3 * size))
    f = data_file(tmp_path, fid)
    assert f.stat().st_size == 3 * size and allocated(f) == 3 * size
    with open(f, "r+b") as fh:
        fh.seek(size + 100)
        fh.write(b"\x00\xff")
    assert c.read(chunks[1][0]) is None and chunks[1][0] not in c
    assert c.stats().corrupt_dropped == 1 and c.stats().used_bytes == 2 * size
    assert allocated(f) == 2 * size and f.stat().st_size == 3 * size
    assert c.read(chunks[0][0]) == chunks[0][1] and c.read(chunks[2][0]) == chunks[2][1]


def test_an_evicted_tail_chunk_leaves_no_block_behind(tmp_path):
    """A file's last chunk is short: punching just its bytes only zeroes its last block,
    which stays allocated (before the fix: 4 KiB per such file held on disk that the budget
    no longer counted). Evicted, or punched out at scan, it takes its whole block."""
    size = 2 * 4096
    (d0, x0), = same_prefix_chunks(1, size)
    tail = b"t" * 100
    dt = hashlib.sha256(tail).hexdigest()
    fid = hashlib.sha256(b"a file with a tail").hexdigest()
    fsize = size + len(tail)
    c = DiskCache(tmp_path, size + len(tail))
    c.scan()
    assert c.write(dt, tail, spot=Spot(fid, size, fsize))
    assert c.write(d0, x0, spot=Spot(fid, 0, fsize))
    f = data_file(tmp_path, fid)
    assert allocated(f) == size + 4096
    c.remove(dt)
    assert dt not in c and d0 in c and allocated(f) == size == c.stats().used_bytes
    # At scan: the tail's bytes written, its record torn by a crash.
    c.close()
    c1 = DiskCache(tmp_path, 1 << 20)
    c1.scan()  # the index rewritten: the tail's old record is gone
    c1.close()
    with open(f, "r+b") as fh:
        fh.seek(size)
        fh.write(tail)
    assert allocated(f) == size + 4096
    c2 = DiskCache(tmp_path, 1 << 20)
    c2.scan()
    assert d0 in c2 and dt not in c2 and allocated(f) == size == c2.stats().used_bytes


def test_scan_punches_torn_writes_and_removes_foreign_files(tmp_path):
    """After a crash: data no index record names (a write torn before its record was
    appended) is punched out of its data file, so the budget counts what the disk holds; a
    data file no record names, a record torn (no trailing newline) and a record whose range
    is a hole (evicted, the index not yet rewritten) name nothing; anything else in
    `files/` is removed. The index is rewritten with the live records only."""
    size = 2 * 4096
    (d0, x0), (d1, x1), (d2, x2) = same_prefix_chunks(3, size)
    fid = hashlib.sha256(b"a file").hexdigest()
    fsize = 4 * size
    c = DiskCache(tmp_path, 1 << 20)
    c.scan()
    assert c.write(d0, x0, spot=Spot(fid, 0, fsize))
    assert c.write(d2, x2, spot=Spot(fid, size, fsize))
    c.remove(d2)  # its hole punched; its record stays in the index until the next scan
    c.close()
    f = data_file(tmp_path, fid)
    with open(f, "r+b") as fh:  # a torn write: bytes at the file's third spot, no record
        fh.seek(2 * size)
        fh.write(b"\xaa" * size)
    torn = data_file(tmp_path, d1)  # a chunk whose record was torn by the crash
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(x1)
    with open(tmp_path / "index", "a") as ix:
        ix.write(f"c {d1} 0 {size} {size} {d1} {xxhash.xxh3_64_hexdigest(x1)} 1")
    orphan = data_file(tmp_path, "ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * 5000)
    for junk in (orphan.parent / ".tmp.abc.1", orphan.parent / "garbage", tmp_path / "files" / "junk"):
        junk.write_bytes(b"x")
    assert allocated(f) == 2 * size
    c2 = DiskCache(tmp_path, 1 << 20)
    c2.scan()
    assert d0 in c2 and d1 not in c2 and d2 not in c2 and c2.read(d0) == x0
    assert allocated(f) == size and f.read_bytes()[size:] == bytes(3 * size)
    assert data_files(tmp_path) == [f] and not torn.exists()
    assert list(orphan.parent.iterdir()) == [] and not (tmp_path / "files" / "junk").exists()
    assert c2.stats().used_bytes == allocated(tmp_path / "files") == size
    assert [r[:3] for r in index_records(tmp_path)] == [["c", fid, "0"]]


def test_chunk_bigger_than_budget_is_not_stored(tmp_path):
    c = DiskCache(tmp_path, 100)
    c.scan()
    d, data = chunk(3, 1000)
    assert c.write(d, data) is False and d not in c


def test_write_errors_are_reported_not_raised(tmp_path):
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(9)
    (tmp_path / "files" / d[:2]).rmdir()  # made by scan; replaced under the daemon:
    (tmp_path / "files" / d[:2]).write_bytes(b"a file where a directory should be")
    assert c.write(d, data) is False
    s = c.stats()
    assert (s.write_errors, s.used_bytes, s.chunks, s.files) == (1, 0, 0, 0) and d not in c
    assert c._lru.reserved == 0  # the room it had reserved is given back


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
    """Allocated bytes of the regular files in one directory: the names from one scandir,
    so a file removed before a later one appeared is never counted with it. Allocated, not
    st_size: a data file is created sparse at its file's size; its holes hold nothing."""
    total = 0
    for e in list(os.scandir(directory)):
        try:
            total += e.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def watch_writes(monkeypatch, measure):
    """Measure just before and just after every write of chunk bytes (where a chunk's
    blocks appear on disk)."""
    real = os.pwritev

    def pwritev(*args, **kwargs):
        measure()
        n = real(*args, **kwargs)
        measure()
        return n

    monkeypatch.setattr(os, "pwritev", pwritev)


WHERE = ["loose", "one-file"]


def spots_for(chunks: list[tuple[str, bytes]], size: int, where: str) -> list[Spot | None]:
    """Where each chunk is written: loose (a data file each, unlinked on eviction), or at
    its offset in one data file of them all (a hole punched on eviction)."""
    if where == "loose":
        return [None] * len(chunks)
    fid = hashlib.sha256(b"one file of them all").hexdigest()
    return [Spot(fid, i * size, len(chunks) * size) for i in range(len(chunks))]


def data_dir(tmp_path, chunks, spots) -> Path:
    """The one directory that holds every data file the chunks are written to."""
    return data_file(tmp_path, spots[0].file if spots[0] else chunks[0][0]).parent


@pytest.mark.parametrize("where", WHERE)
def test_usage_never_exceeds_the_budget_not_even_during_a_write(tmp_path, monkeypatch, where):
    """Budget 3 chunks, 10 writes: the bytes on disk and the index stay within the budget
    at every step; before the fix (format 1) the 4th chunk landed before the oldest was
    evicted (4 chunks on disk). Chunks of whole blocks, so allocated bytes are exact."""
    size = 2 * 4096
    chunks = same_prefix_chunks(10, size)
    spots = spots_for(chunks, size, where)
    budget = 3 * size
    c = DiskCache(tmp_path, budget)
    c.scan()
    sub = data_dir(tmp_path, chunks, spots)
    seen: list[tuple[int, int]] = []

    def measure():
        seen.append((bytes_on_disk(sub) if sub.exists() else 0, c.stats().used_bytes))

    watch_writes(monkeypatch, measure)
    for (d, data), spot in zip(chunks, spots):
        before = len(seen)
        assert c.write(d, data, spot=spot)
        assert len(seen) >= before + 2  # the bytes went through the watched write
        measure()
    assert max(disk for disk, _ in seen) <= budget, seen
    assert max(used for _, used in seen) <= budget, seen
    assert seen[-1] == (budget, budget) and c.stats().evicted == 7
    assert [d for d, _ in chunks[-3:]] == [d for d, _ in chunks if d in c]
    assert len(os.listdir(sub)) == (3 if where == "loose" else 1)


@pytest.mark.parametrize("where", WHERE)
def test_concurrent_writes_stay_within_the_budget(tmp_path, monkeypatch, where):
    """Four threads writing 12 chunks each into a budget of 3: the room a write needs is
    made (a file unlinked, a hole punched) and held before its bytes land, so no instant
    sees more than the budget."""
    import threading

    size = 2 * 4096
    chunks = same_prefix_chunks(48, size)
    spots = spots_for(chunks, size, where)
    budget = 3 * size
    c = DiskCache(tmp_path, budget)
    c.scan()
    sub = data_dir(tmp_path, chunks, spots)
    sub.mkdir(exist_ok=True)  # made by scan
    peak = [0]
    stop = threading.Event()

    def measure():
        peak[0] = max(peak[0], bytes_on_disk(sub))

    def poll():
        while not stop.is_set():
            measure()

    watch_writes(monkeypatch, measure)
    poller = threading.Thread(target=poll)
    poller.start()
    results: list[bool] = []
    try:
        work = list(zip(chunks, spots))
        writers = [threading.Thread(target=lambda part=work[k::4]: results.extend(
            c.write(d, data, spot=spot) for (d, data), spot in part)) for k in range(4)]
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
    assert c._lru.reserved == 0


# -- misses, by why (issue 12, defect 11) -------------------------------------------------

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
    fired = _on_open(monkeypatch, data_file(tmp_path, d), lambda: c.write(d2, data2 + data2))
    assert c.read(d) is None and fired  # evicted (d2 needs the whole budget) as it was opened
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.read_errors, s.evicted) == (1, 0, 0, 1)
    assert d not in c and d2 in c and s.used_bytes == 2_000


def test_a_newer_entry_survives_a_read_that_raced_with_its_predecessor(tmp_path, monkeypatch):
    """Removed and written again elsewhere (at its spot in a file) while a reader had
    located the loose copy: the reader's ENOENT must not drop the new entry, whose bytes
    would then stay on disk uncounted (before the fix it did)."""
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    c.write(d, data)
    fid = hashlib.sha256(b"a file").hexdigest()

    def replace():
        c.remove(d)
        c.write(d, data, spot=Spot(fid, 0, len(data)))

    fired = _on_open(monkeypatch, data_file(tmp_path, d), replace)
    assert c.read_into(d, memoryview(bytearray(len(data)))) is False and fired
    assert c.holds(d, Spot(fid, 0, len(data))) and c.stats().raced == 1
    assert c.stats().corrupt_dropped == 0
    assert data_files(tmp_path) == [data_file(tmp_path, fid)]
    assert sum(f.stat().st_size for f in data_files(tmp_path)) == c.stats().used_bytes == len(data)
    assert c.read(d) == data


def test_a_wrong_read_that_raced_with_a_rewrite_of_its_spot_drops_nothing(tmp_path, monkeypatch):
    """Evicted and written again at the same spot while a reader had located the old
    record, the new bytes from a fill client's memory that changed after its xxh3 was
    taken: the reader's check fails against the old record, which is a race (counted
    `raced`), not damage; the new record is not dropped by the old reader, and is itself
    caught as corrupt on its first read-back, never served."""
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(1)
    c.write(d, data)
    changed = bytes([data[0] ^ 1]) + data[1:]

    def replace():
        c.remove(d)
        c.write(d, changed, xxh=xxhash.xxh3_64_hexdigest(data))  # memory changed under us

    fired = _on_open(monkeypatch, data_file(tmp_path, d), replace)
    assert c.read_into(d, memoryview(bytearray(len(data)))) is False and fired
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.used_bytes) == (1, 0, len(data)) and d in c
    assert c.read(d) is None and d not in c and c.stats().corrupt_dropped == 1
    assert data_files(tmp_path) == [] and c.stats().used_bytes == 0


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
    sub = tmp_path / "files" / d1[:2]
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
    the right bytes) where a data file should be: dropped as corrupt, removed, a miss."""
    import threading

    c = DiskCache(tmp_path, 10_000)
    c.scan()
    d, data = chunk(5)
    c.write(d, data)
    f = data_file(tmp_path, d)
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
    """Special files and directories at data paths the index names are removed at scan, as
    are files the index does not name and files in the wrong directory (before the fix a
    directory there stopped the scan with EISDIR)."""
    c = DiskCache(tmp_path, 10_000)
    c.scan()
    (d, data), (d2, x2), (d3, x3) = same_prefix_chunks(3, 1000)
    for digest, x in ((d, data), (d2, x2), (d3, x3)):
        assert c.write(digest, x)
    c.close()
    good = data_file(tmp_path, d)
    sub = good.parent
    for f in (data_file(tmp_path, d2), data_file(tmp_path, d3)):
        f.unlink()
    data_file(tmp_path, d2).mkdir()
    (data_file(tmp_path, d2) / "x").write_bytes(x2)
    os.mkfifo(data_file(tmp_path, d3))
    (sub / (d[:2] + "1" * 62)).mkdir()  # a data file's name the index does not know
    (sub / "garbage-dir").mkdir()
    (tmp_path / "files" / "zz").mkdir()
    (tmp_path / "files" / "zz" / d).write_bytes(data)  # wrong directory
    c2 = DiskCache(tmp_path, 10_000)
    c2.scan()
    assert sorted(p.name for p in sub.iterdir()) == [good.name]
    assert list((tmp_path / "files" / "zz").iterdir()) == []
    assert c2.stats().chunks == 1 and c2.read(d) == data
    assert d2 not in c2 and d3 not in c2 and len(index_records(tmp_path)) == 1


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
    c = DiskCache(mnt, 64 << 20)
    try:
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
        # What failed left nothing on disk: the data files are the chunks cached, no more.
        assert [f.name for f in data_files(mnt)] == sorted(d for d, _ in chunks if d in c)
        assert sum(f.stat().st_size for f in data_files(mnt)) == c.stats().used_bytes
    finally:
        c.close()  # its index is open: the tmpfs would stay busy, mounted
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, f"could not unmount the test's tmpfs: {r.stderr.strip()}"
