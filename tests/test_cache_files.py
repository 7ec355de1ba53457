"""Units: the disk cache's format 2 (real files on tmp_path, no FUSE).

A file read through the mount becomes one sparse data file `files/<fid[:2]>/<fid>` with
its chunks at their own offsets; a complete file is sealed and handed out whole; eviction
punches holes in unsealed files and unlinks sealed ones whole; `scan` rebuilds all of it
from the index and the data files (docs/FORMAT.md "Disk cache")."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, example, given, settings, strategies as st

from p2pfs import diskcache
from p2pfs._buffers import aligned_empty
from p2pfs.diskcache import DiskCache
from p2pfs.errors import ConfigError
from p2pfs.plan import Spot

BLOCK = 4096
C = 16 * BLOCK  # a chunk: block-aligned, so a punched chunk frees all its blocks


def fid_of(name: str) -> str:
    return hashlib.sha256(f"file {name}".encode()).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeFile:
    """A file's bytes cut into chunks of C (the last one shorter when `tail`)."""

    def __init__(self, name: str, n: int, tail: int = 0, seed: int | None = None) -> None:
        rnd = random.Random(f"{name}/{seed}")
        sizes = [C] * n + ([tail] if tail else [])
        self.fid = fid_of(name)
        self.data = rnd.randbytes(sum(sizes))
        self.fsize = len(self.data)
        self.chunks: list[tuple[str, bytes, Spot]] = []
        at = 0
        for size in sizes:
            part = self.data[at:at + size]
            self.chunks.append((sha(part), part, Spot(self.fid, at, self.fsize)))
            at += size

    def write(self, cache: DiskCache, *which: int) -> None:
        for i in which or range(len(self.chunks)):
            digest, part, spot = self.chunks[i]
            assert cache.write(digest, part, spot=spot)


def open_cache(path: Path, budget: int = 64 * C) -> DiskCache:
    c = DiskCache(path, budget)
    c.scan()
    return c


def data_path(root: Path, fid: str) -> Path:
    return root / "files" / fid[:2] / fid


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def allocated_all(root: Path) -> tuple[int, int]:
    """Bytes allocated to data files under files/, and how many files."""
    total = n = 0
    for dirpath, _, names in os.walk(root / "files"):
        for name in names:
            total += allocated(Path(dirpath) / name)
            n += 1
    return total, n


def is_hole(path: Path, at: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, at, os.SEEK_HOLE) == at
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return True
    finally:
        os.close(fd)


def no_data_from(path: Path, at: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, at, os.SEEK_DATA)
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return True
    finally:
        os.close(fd)
    return False


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_behind_our_back(path: Path, at: int, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, 0x01 | 0x02, at, size) != 0:  # KEEP_SIZE | PUNCH_HOLE
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def scribble(path: Path, data: bytes, at: int) -> None:
    """Write into a data file behind the cache's back (a crash's torn write, damage)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, at)
    finally:
        os.close(fd)


def sealed(root: Path, name: str, n: int, budget: int = 64 * C) -> tuple[DiskCache, FakeFile]:
    f = FakeFile(name, n)
    c = open_cache(root, budget)
    f.write(c)
    assert c.seal(f.fid)
    return c, f


def before_open(monkeypatch, path: Path, action, *, kind: str) -> list[bool]:
    """Run `action` once, just before the cache opens `path` to `kind` ("read", "punch":
    open for writing without creating): the moment a race would strike. The cache and the
    files stay real; returns a flag that turns False once the action ran."""
    real_open = os.open
    target = str(path)
    armed = [True]

    def open_hook(p, flags, *args, **kwargs):
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR))
        is_kind = not writes if kind == "read" else writes and not flags & os.O_CREAT
        if armed[0] and str(p) == target and is_kind:
            armed[0] = False
            action()
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_hook)
    return armed


def read_back(cache: DiskCache, digest: str, size: int, prefer: Spot | None = None) -> bytes | None:
    dest = memoryview(bytearray(size))
    return bytes(dest) if cache.read_into(digest, dest, prefer=prefer) else None


# -- 1. one data file per file --------------------------------------------------------------
@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_spots_of_one_file_land_at_their_offsets_of_one_data_file(tmp_path, order):
    f = FakeFile("a", 5, tail=1000)
    c = open_cache(tmp_path)
    idx = list(range(len(f.chunks)))
    if order == "reversed":
        idx.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(idx)
    f.write(c, *idx)
    path = data_path(tmp_path, f.fid)
    assert os.stat(path).st_size == f.fsize
    assert path.read_bytes() == f.data
    assert sorted(p.name for p in (tmp_path / "files").rglob("*") if p.is_file()) == [f.fid]
    st_ = c.stats()
    assert (st_.files, st_.chunks, st_.used_bytes) == (1, len(f.chunks), f.fsize)
    for digest, part, spot in f.chunks:
        assert c.holds(digest, spot) and c.read(digest) == part


def test_page_aligned_chunks_go_through_o_direct_and_land_right(tmp_path):
    # The fill path writes from page-aligned shared memory: the O_DIRECT branch.
    f = FakeFile("direct", 3, tail=5000)
    c = open_cache(tmp_path)
    for digest, part, spot in reversed(f.chunks):
        buf = aligned_empty(len(part))
        buf[:] = part
        assert c.write(digest, buf, spot=spot)
    assert data_path(tmp_path, f.fid).read_bytes() == f.data
    for digest, part, spot in f.chunks:
        dest = aligned_empty(len(part))
        assert c.read_into(digest, dest, prefer=spot) and bytes(dest) == part


def test_a_partly_written_file_is_sparse_at_its_full_size(tmp_path):
    f = FakeFile("sparse", 4)
    c = open_cache(tmp_path)
    f.write(c, 2)
    path = data_path(tmp_path, f.fid)
    assert os.stat(path).st_size == f.fsize
    assert allocated(path) <= C + BLOCK
    assert is_hole(path, 0) and is_hole(path, C) and is_hole(path, 3 * C)
    assert path.read_bytes()[2 * C:3 * C] == f.chunks[2][1]


def test_a_spot_that_does_not_fit_its_file_is_refused(tmp_path):
    f = FakeFile("fit", 2)
    c = open_cache(tmp_path)
    digest, part, spot = f.chunks[1]
    assert not c.write(digest, part, spot=Spot(f.fid, f.fsize - C + 1, f.fsize))
    assert not c.write(digest, part, spot=Spot("not-a-hex-id", 0, f.fsize))
    f.write(c, 0)
    # A file id names one size: a spot claiming another size of the same file is refused.
    assert not c.write(digest, part, spot=Spot(f.fid, C, f.fsize + C))
    assert c.stats().chunks == 1


# -- 2. complete, seal, open_sealed -----------------------------------------------------------
def test_a_complete_file_seals_and_opens_read_only(tmp_path):
    f = FakeFile("seal", 3, tail=777)
    c = open_cache(tmp_path)
    f.write(c, 0, 1, 3)
    assert not c.complete(f.fid) and not c.needs_seal(f.fid)
    assert not c.seal(f.fid)
    assert c.open_sealed(f.fid) is None
    f.write(c, 2)
    assert c.complete(f.fid) and c.needs_seal(f.fid)
    assert c.seal(f.fid)
    assert not c.needs_seal(f.fid) and c.seal(f.fid)  # sealing twice is a no-op
    assert c.stats().sealed_files == 1
    fd = c.open_sealed(f.fid)
    assert fd is not None
    try:
        assert os.fstat(fd).st_size == f.fsize
        assert os.pread(fd, f.fsize + 10, 0) == f.data
        with pytest.raises(OSError) as exc:
            os.write(fd, b"x")
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert c.open_sealed(fid_of("never written")) is None


def test_a_loose_chunk_is_never_sealed(tmp_path):
    digest, part = sha(b"z" * C), b"z" * C
    c = open_cache(tmp_path)
    assert c.write(digest, part)
    assert c.complete(digest) and not c.needs_seal(digest)


# -- 3. the seal checks chunks written from memory we do not own -------------------------------
def test_seal_drops_a_chunk_whose_bytes_changed_after_verification(tmp_path):
    f = FakeFile("changed", 3)
    c = open_cache(tmp_path)
    f.write(c, 0, 2)
    digest, good, spot = f.chunks[1]
    bad = bytearray(good)
    bad[100] ^= 0xFF  # the fill client changed its memory after we checked the sha256
    assert c.write(digest, bytes(bad), xxh=xxhash.xxh3_64_hexdigest(good), spot=spot)
    assert c.needs_seal(f.fid)
    assert not c.seal(f.fid)
    assert c.stats().corrupt_dropped == 1
    assert not c.holds(digest, spot)
    assert c.open_sealed(f.fid) is None and c.stats().sealed_files == 0
    # Written again with the right bytes, the file seals.
    f.write(c)
    assert c.seal(f.fid)
    fd = c.open_sealed(f.fid)
    assert fd is not None
    try:
        assert os.pread(fd, f.fsize, 0) == f.data
    finally:
        os.close(fd)


def test_an_unchecked_chunk_with_changed_bytes_is_never_read_back(tmp_path):
    f = FakeFile("changed2", 2)
    c = open_cache(tmp_path)
    digest, good, spot = f.chunks[0]
    assert c.write(digest, b"\0" * len(good), xxh=xxhash.xxh3_64_hexdigest(good), spot=spot)
    assert c.read(digest) is None
    assert c.stats().corrupt_dropped == 1 and digest not in c
    path = data_path(tmp_path, f.fid)
    assert not path.exists() or is_hole(path, 0)


def test_an_unchecked_chunk_that_reads_back_right_is_sealed_and_survives_restart(tmp_path):
    f = FakeFile("fill", 2)
    c = open_cache(tmp_path)
    for digest, part, spot in f.chunks:
        assert c.write(digest, part, xxh=xxhash.xxh3_64_hexdigest(part), spot=spot)
    assert c.seal(f.fid) and c.stats().corrupt_dropped == 0
    c.close()
    c2 = open_cache(tmp_path)
    assert c2.stats().sealed_files == 1 and not c2.needs_seal(f.fid)


def test_chunks_from_the_daemons_own_buffers_are_checked_and_not_read_back(tmp_path, monkeypatch):
    """A write-back of the daemon's own verified buffer (owned) is recorded checked, so
    the seal reads back only what came from a fill client's memory."""
    f = FakeFile("owned", 3)
    c = open_cache(tmp_path)
    (d0, p0, s0), (d1, p1, s1), (d2, p2, s2) = f.chunks
    assert c.write(d0, p0, xxh=xxhash.xxh3_64_hexdigest(p0), spot=s0, owned=True)
    assert c.write(d1, p1, xxh=xxhash.xxh3_64_hexdigest(p1), spot=s1, owned=True)
    assert c.write(d2, p2, xxh=xxhash.xxh3_64_hexdigest(p2), spot=s2)  # a fill client's
    read_back = []
    real = c._load
    monkeypatch.setattr(c, "_load", lambda found, *a, **k: read_back.append(found.key) or
                        real(found, *a, **k))
    assert c.seal(f.fid)
    assert read_back == [(f.fid, s2.at)]
    c.close()
    c2 = open_cache(tmp_path)  # the records say checked: a restart keeps the seal
    assert c2.stats().sealed_files == 1 and not c2.needs_seal(f.fid)


# -- 4. eviction: holes in unsealed files, sealed files whole ---------------------------------
def test_evicting_from_an_unsealed_file_punches_only_that_chunk(tmp_path):
    f = FakeFile("unsealed", 3)
    other = FakeFile("other", 1)
    c = open_cache(tmp_path, budget=3 * C)
    f.write(c)
    path = data_path(tmp_path, f.fid)
    before = allocated(path)
    assert not is_hole(path, 0)
    other.write(c)  # the budget holds 3 chunks: the least recent (chunk 0) goes
    assert c.stats().evicted == 1
    assert not c.holds(f.chunks[0][0], f.chunks[0][2])
    assert is_hole(path, 0) and not is_hole(path, C) and not is_hole(path, 2 * C)
    assert allocated(path) <= before - C
    assert os.stat(path).st_size == f.fsize
    raw = path.read_bytes()
    assert raw[:C] == b"\0" * C and raw[C:] == f.data[C:]
    for digest, part, spot in f.chunks[1:]:
        assert c.read(digest) == part
    assert c.read(f.chunks[0][0]) is None and c.stats().corrupt_dropped == 0


def test_the_last_chunk_of_an_unsealed_file_going_unlinks_it(tmp_path):
    f = FakeFile("last", 3)
    c = open_cache(tmp_path, budget=2 * C)
    f.write(c, 0)
    big = FakeFile("big", 2)
    big.write(c)
    assert not data_path(tmp_path, f.fid).exists()
    assert c.stats().files == 1


def test_a_sealed_file_is_evicted_whole_and_its_holder_still_reads_it_all(tmp_path):
    f = FakeFile("sealed", 2, tail=BLOCK + 5)
    c = open_cache(tmp_path, budget=4 * C)
    f.write(c)
    assert c.seal(f.fid)
    fd = c.open_sealed(f.fid)
    assert fd is not None
    try:
        other = FakeFile("newer", 2)
        other.write(c)  # 3 + 2 chunks > 4: one chunk of the sealed file must go, so all go
        path = data_path(tmp_path, f.fid)
        assert not path.exists()
        assert c.stats().sealed_files == 0
        assert all(not c.holds(d, s) for d, _, s in f.chunks)
        assert c.open_sealed(f.fid) is None
        assert os.pread(fd, f.fsize, 0) == f.data
        for d, part, s in other.chunks:
            assert c.read(d) == part
    finally:
        os.close(fd)


# -- 5. the budget --------------------------------------------------------------------------
def test_budget_holds_on_disk_for_spots_of_many_files(tmp_path):
    budget = 10 * C
    c = open_cache(tmp_path, budget=budget)
    files = [FakeFile(f"b{i}", 4, tail=3000) for i in range(6)]
    rnd = random.Random(1)
    todo = [(f, i) for f in files for i in range(len(f.chunks))]
    rnd.shuffle(todo)
    for f, i in todo:
        f.write(c, i)
        used = c.stats().used_bytes
        disk, _ = allocated_all(tmp_path)
        assert used <= budget
        assert disk <= budget + BLOCK * c.stats().chunks
    for f in files:
        for digest, part, spot in f.chunks:
            got = c.read(digest)
            assert got is None or got == part


def test_budget_holds_with_concurrent_writers(tmp_path):
    budget = 12 * C
    c = open_cache(tmp_path, budget=budget)
    files = [FakeFile(f"t{i}", 6, tail=1234) for i in range(8)]
    over: list[int] = []
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            rnd = random.Random(k)
            for _ in range(60):
                f = rnd.choice(files)
                i = rnd.randrange(len(f.chunks))
                digest, part, spot = f.chunks[i]
                c.write(digest, part, spot=spot)
                if c.stats().used_bytes > budget:
                    over.append(c.stats().used_bytes)
                got = c.read(f.chunks[rnd.randrange(len(f.chunks))][0])
                if got is not None and bytes(got) not in {p for _, p, _ in f.chunks}:
                    over.append(-1)
                if rnd.random() < 0.2:
                    if c.seal(f.fid):
                        fd = c.open_sealed(f.fid)
                        if fd is not None:
                            try:
                                if os.pread(fd, f.fsize, 0) != f.data:
                                    over.append(-2)
                            finally:
                                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not over
    s = c.stats()
    disk, nfiles = allocated_all(tmp_path)
    assert s.used_bytes <= budget and s.files == nfiles
    assert disk <= budget + BLOCK * s.chunks
    assert s.corrupt_dropped == 0 and s.write_errors == 0


# -- 6. restart ---------------------------------------------------------------------------------
def test_restart_keeps_chunks_and_the_sealed_state(tmp_path):
    whole = FakeFile("whole", 3, tail=10)
    part = FakeFile("part", 3)
    c = open_cache(tmp_path)
    whole.write(c)
    assert c.seal(whole.fid)
    part.write(c, 0, 2)
    used = c.stats().used_bytes
    c.close()
    c2 = open_cache(tmp_path)
    s = c2.stats()
    assert (s.chunks, s.files, s.sealed_files, s.used_bytes) == (6, 2, 1, used)
    fd = c2.open_sealed(whole.fid)
    assert fd is not None
    os.close(fd)
    assert c2.open_sealed(part.fid) is None and not c2.complete(part.fid)
    for digest, data, spot in whole.chunks + [part.chunks[0], part.chunks[2]]:
        assert c2.holds(digest, spot) and read_back(c2, digest, len(data), spot) == data
    part.write(c2, 1)
    assert c2.seal(part.fid)


def test_restart_drops_a_record_whose_range_was_punched(tmp_path):
    f = FakeFile("punched", 3)
    c = open_cache(tmp_path)
    f.write(c)
    c.close()
    punch_behind_our_back(data_path(tmp_path, f.fid), C, C)
    c2 = open_cache(tmp_path)
    assert not c2.holds(f.chunks[1][0], f.chunks[1][2]) and f.chunks[1][0] not in c2
    assert c2.stats().chunks == 2 and c2.stats().used_bytes == 2 * C
    assert c2.read(f.chunks[0][0]) == f.chunks[0][1]
    assert c2.read(f.chunks[2][0]) == f.chunks[2][1]
    assert c2.stats().corrupt_dropped == 0


def test_restart_drops_a_sealed_file_that_lost_a_chunk(tmp_path):
    c, f = sealed(tmp_path, "sealedpunch", 3)
    c.close()
    punch_behind_our_back(data_path(tmp_path, f.fid), 0, C)
    c2 = open_cache(tmp_path)
    assert c2.open_sealed(f.fid) is None and c2.stats().sealed_files == 0
    f.write(c2, 0)  # not sealed any more: it may be filled again, then sealed again
    assert c2.seal(f.fid)


def test_restart_punches_data_no_record_names(tmp_path):
    f = FakeFile("torn", 4)
    c = open_cache(tmp_path)
    f.write(c, 0)
    c.close()
    path = data_path(tmp_path, f.fid)
    # A write torn by a crash: its bytes landed, its record did not.
    scribble(path, f.chunks[2][1], 2 * C)
    scribble(path, b"x" * 100, C + 5)
    assert allocated(path) >= 2 * C + BLOCK
    c2 = open_cache(tmp_path)
    assert no_data_from(path, C)
    assert allocated(path) <= C + BLOCK
    assert c2.stats().used_bytes == C and c2.read(f.chunks[0][0]) == f.chunks[0][1]


def test_restart_ignores_a_torn_last_index_line_and_garbage(tmp_path):
    f = FakeFile("idx", 3)
    c = open_cache(tmp_path)
    f.write(c, 0, 1)
    c.close()
    index = tmp_path / "index"
    lines = index.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.startswith(b"c ") for line in lines)
    # The data of chunk 2 is on disk, its record torn (no newline) by a crash.
    path = data_path(tmp_path, f.fid)
    scribble(path, f.chunks[2][1], 2 * C)
    torn = lines[1].replace(f" {C} ".encode(), f" {2 * C} ".encode(), 1)
    torn = torn.replace(f.chunks[1][0].encode(), f.chunks[2][0].encode())
    torn = torn.replace(lines[1].split()[6], xxhash.xxh3_64_hexdigest(f.chunks[2][1]).encode())
    assert torn != lines[1] and torn.endswith(b"\n")
    garbage = [b"hello world\n", b"\xff\xfe\x00 binary\n", b"c " + b"0" * 64 + b" 1 2\n",
               b"s nothex\n", b"\n", b"c " + f.fid.encode() + b" 0 10 20 "
               + f.chunks[0][0].encode() + b" 0123456789abcdef 1\n"]  # chunk beyond its file
    index.write_bytes(lines[0] + garbage[0] + garbage[1] + lines[1] + b"".join(garbage[2:])
                      + torn[:-1])
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == 2
    assert c2.read(f.chunks[0][0]) == f.chunks[0][1]
    assert c2.read(f.chunks[1][0]) == f.chunks[1][1]
    assert f.chunks[2][0] not in c2 and no_data_from(path, 2 * C)
    # The index was rewritten with the live records only, each a whole line.
    text = index.read_bytes()
    assert text.endswith(b"\n") and len(text.splitlines()) == 2
    # ... and appending goes on cleanly after it.
    f.write(c2, 2)
    c2.close()
    c3 = open_cache(tmp_path)
    assert c3.stats().chunks == 3 and c3.complete(f.fid)


def test_restart_removes_unknown_files_under_files(tmp_path):
    f = FakeFile("known", 1)
    c = open_cache(tmp_path)
    f.write(c)
    c.close()
    files = tmp_path / "files"
    unrecorded = fid_of("unrecorded")
    wrong_dir = fid_of("wrong dir")
    strays = [
        files / f.fid[:2] / "notes.txt",
        files / unrecorded[:2] / unrecorded,  # a hex name with no record
        files / ("00" if wrong_dir[:2] != "00" else "11") / wrong_dir,  # under another prefix
        files / "stray-top-level-file",
    ]
    for p in strays:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"junk")
    a_dir = files / "ab" / ("ab" + "0" * 62)
    a_dir.mkdir(parents=True)
    (a_dir / "inside").write_bytes(b"junk")
    link = files / f.fid[:2] / fid_of("link")
    os.symlink(data_path(tmp_path, f.fid), link)
    c2 = open_cache(tmp_path)
    for p in strays + [a_dir, link]:
        assert not os.path.lexists(p), p
    assert data_path(tmp_path, f.fid).exists() and c2.read(f.chunks[0][0]) == f.chunks[0][1]


def test_restart_drops_a_data_file_of_the_wrong_size(tmp_path):
    f = FakeFile("size", 2)
    c = open_cache(tmp_path)
    f.write(c)
    c.close()
    os.truncate(data_path(tmp_path, f.fid), f.fsize + 1)
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == 0 and c2.stats().used_bytes == 0
    assert not data_path(tmp_path, f.fid).exists()


def test_restart_over_budget_evicts_sealed_files_whole(tmp_path):
    c = open_cache(tmp_path, budget=8 * C)
    files = [FakeFile(f"rs{i}", 3) for i in range(2)]
    for f in files:
        f.write(c)
        assert c.seal(f.fid)
    c.close()
    c2 = open_cache(tmp_path, budget=4 * C)  # room for one of them
    assert c2.stats().used_bytes <= 4 * C
    for f in files:
        fd = c2.open_sealed(f.fid)
        if fd is None:
            assert not data_path(tmp_path, f.fid).exists()
            assert all(d not in c2 for d, _, _ in f.chunks)
            continue
        try:
            assert os.pread(fd, f.fsize, 0) == f.data
        finally:
            os.close(fd)
    assert c2.stats().sealed_files == 1


def test_open_sealed_never_hands_out_a_new_copy_made_while_it_opened(tmp_path, monkeypatch):
    # The race: open_sealed looked the file up, then, before it opened the path, the file
    # was evicted and a new, unsealed (sparse) copy of it started. The hook runs that
    # eviction and write at the moment of the open; the cache and the files are real.
    c, f = sealed(tmp_path, "race", 3, budget=4 * C)
    other = FakeFile("race-other", 3)

    def evict_and_start_a_new_copy():
        other.write(c)  # evicts the sealed file whole
        f.write(c, 0)  # a new copy of it, one chunk of three
        assert not c.complete(f.fid)

    armed = before_open(monkeypatch, data_path(tmp_path, f.fid), evict_and_start_a_new_copy,
                        kind="read")
    fd = c.open_sealed(f.fid)
    monkeypatch.undo()
    assert not armed[0]
    if fd is not None:
        try:
            assert os.pread(fd, f.fsize, 0) == f.data
        finally:
            os.close(fd)
    assert c.open_sealed(f.fid) is None


def test_removing_a_chunk_of_a_sealed_file_never_leaves_a_hole_under_a_holder(tmp_path):
    c, f = sealed(tmp_path, "rm", 3)
    fd = c.open_sealed(f.fid)
    assert fd is not None
    try:
        c.remove(f.chunks[1][0])
        assert os.pread(fd, f.fsize, 0) == f.data
        assert c.open_sealed(f.fid) is None
        s = c.stats()
        assert (s.chunks, s.used_bytes, s.files) == (0, 0, 0)
        assert not data_path(tmp_path, f.fid).exists()
    finally:
        os.close(fd)


def test_a_corrupt_chunk_of_a_sealed_file_drops_it_whole_not_under_a_holder(tmp_path):
    c, f = sealed(tmp_path, "corrupt-sealed", 3)
    fd = c.open_sealed(f.fid)
    assert fd is not None
    try:
        # Damage behind our back: the holder sees it too; the cache must drop the file
        # without punching holes into what the holder maps.
        scribble(data_path(tmp_path, f.fid), b"X", C + 1)
        assert c.read(f.chunks[1][0]) is None and c.stats().corrupt_dropped == 1
        expect = bytearray(f.data)
        expect[C + 1] = ord("X")
        assert os.pread(fd, f.fsize, 0) == bytes(expect)
        assert c.stats().chunks == 0 and not data_path(tmp_path, f.fid).exists()
    finally:
        os.close(fd)


def test_restart_over_budget_evicts_down_to_it(tmp_path):
    c = open_cache(tmp_path, budget=8 * C)
    files = [FakeFile(f"r{i}", 2) for i in range(4)]
    for f in files:
        f.write(c)
    c.close()
    c2 = open_cache(tmp_path, budget=3 * C)
    assert c2.stats().used_bytes <= 3 * C
    disk, _ = allocated_all(tmp_path)
    assert disk <= 3 * C + BLOCK * c2.stats().chunks


# -- 7. loose chunks ------------------------------------------------------------------------------
def test_a_loose_chunk_is_dropped_once_written_at_a_real_spot(tmp_path):
    f = FakeFile("loose", 3)
    digest, part, spot = f.chunks[1]
    c = open_cache(tmp_path)
    assert c.write(digest, part)  # a peer's request: no spot
    lone = data_path(tmp_path, digest)
    assert lone.read_bytes() == part and c.holds(digest, None)
    assert c.stats().files == 1
    assert c.write(digest, part, spot=spot)
    assert not lone.exists()
    assert c.holds(digest, None) and c.holds(digest, spot)
    s = c.stats()
    assert (s.chunks, s.used_bytes) == (1, C)
    assert read_back(c, digest, C) == part
    assert data_path(tmp_path, f.fid).read_bytes()[C:2 * C] == part
    c.close()
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == 1 and not lone.exists() and read_back(c2, digest, C) == part


def test_a_loose_chunk_already_held_at_a_spot_is_a_second_copy_until_evicted(tmp_path):
    digest, part = sha(b"q" * C), b"q" * C
    c = open_cache(tmp_path)
    assert c.write(digest, part)
    assert c.write(digest, part)  # the same chunk again: already there
    assert c.stats().chunks == 1


# -- 8. the format -----------------------------------------------------------------------------
def test_a_cache_of_another_format_is_refused_with_advice(tmp_path):
    (tmp_path / "format").write_text("p2pfs-cache 3\n")
    with pytest.raises(ConfigError) as exc:
        DiskCache(tmp_path, C).scan()
    assert "another --cache-dir" in str(exc.value)
    assert (tmp_path / "format").read_text() == "p2pfs-cache 3\n"


def test_a_new_cache_dir_gets_its_format_file(tmp_path):
    open_cache(tmp_path)
    assert (tmp_path / "format").read_text() == "p2pfs-cache 2\n"
    open_cache(tmp_path)  # and reads it back


def test_a_format_1_cache_is_migrated(tmp_path):
    old = tmp_path / "chunks"
    chunks = []
    for i in range(3):
        data = random.Random(i).randbytes(C + i)
        digest = sha(data)
        (old / digest[:2]).mkdir(parents=True, exist_ok=True)
        (old / digest[:2] / f"{digest}.{xxhash.xxh3_64_hexdigest(data)}").write_bytes(data)
        chunks.append((digest, data))
    bad = b"b" * C
    bad_digest = sha(bad)
    (old / bad_digest[:2]).mkdir(exist_ok=True)
    (old / bad_digest[:2] / f"{bad_digest}.{xxhash.xxh3_64_hexdigest(bad)}").write_bytes(b"c" * C)
    (old / "ab").mkdir(exist_ok=True)
    (old / "ab" / "not-a-chunk").write_bytes(b"junk")
    c = open_cache(tmp_path)
    assert not old.exists()
    assert (tmp_path / "format").read_text() == "p2pfs-cache 2\n"
    for digest, data in chunks:
        assert data_path(tmp_path, digest).read_bytes() == data
        assert c.read(digest) == data
    assert c.read(bad_digest) is None and c.stats().corrupt_dropped == 1
    c.close()
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == 3
    for digest, data in chunks:
        assert read_back(c2, digest, len(data)) == data
    # Read as part of a file, a migrated chunk moves into that file.
    fid = fid_of("migrated")
    digest, data = chunks[0]
    spot = Spot(fid, 0, len(data))
    assert c2.write(digest, data, spot=spot)
    assert not data_path(tmp_path, digest).exists() and c2.holds(digest, spot)


# -- 9. two spots of one chunk ------------------------------------------------------------------
def test_read_into_prefers_the_spot_asked_for(tmp_path):
    a, b = FakeFile("pa", 2), FakeFile("pb", 2)
    c = open_cache(tmp_path)
    shared, data = sha(b"s" * C), b"s" * C
    spot_a, spot_b = Spot(a.fid, C, a.fsize), Spot(b.fid, 0, b.fsize)
    a.write(c, 0)
    assert c.write(shared, data, spot=spot_a) and c.write(shared, data, spot=spot_b)
    assert c.holds(shared, spot_a) and c.holds(shared, spot_b) and c.stats().chunks == 3
    # Damage b's copy behind our back: only a read from b sees it.
    scribble(data_path(tmp_path, b.fid), b"X", 10)
    for _ in range(3):
        assert read_back(c, shared, C, prefer=spot_a) == data
    assert c.stats().corrupt_dropped == 0
    assert read_back(c, shared, C, prefer=spot_b) is None
    assert c.stats().corrupt_dropped == 1 and not c.holds(shared, spot_b)
    assert read_back(c, shared, C, prefer=spot_b) == data  # falls back to a's copy
    assert c.holds(shared, spot_a)


def test_a_chunk_in_two_files_survives_the_eviction_of_one(tmp_path):
    a, b = FakeFile("ea", 1), FakeFile("eb", 1)
    c = open_cache(tmp_path, budget=3 * C)
    shared, data = sha(b"e" * C), b"e" * C
    spot_a, spot_b = Spot(a.fid, C, a.fsize + C), Spot(b.fid, C, b.fsize + C)
    assert c.write(shared, data, spot=spot_a)
    assert c.write(shared, data, spot=spot_b)
    a2 = FakeFile("ea2", 2)
    a2.write(c)  # 4 chunks > 3: the least recent, the copy in a, goes
    assert not c.holds(shared, spot_a) and c.holds(shared, spot_b)
    assert shared in c and c.xxh_of(shared) == xxhash.xxh3_64_hexdigest(data)
    assert c.read(shared) == data
    assert read_back(c, shared, C, prefer=spot_a) == data
    c.remove(shared)
    assert shared not in c and c.read(shared) is None


# -- a property: any sequence of operations ------------------------------------------------------
SMALL = 2 * BLOCK
_OPS = st.lists(
    st.tuples(st.sampled_from(["write", "whole", "fill", "read", "prefer", "seal", "open", "remove",
                               "restart"]),
              st.integers(0, 3), st.integers(0, 3)),
    min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, budget_chunks=st.integers(1, 8), size=st.sampled_from([SMALL, 5000, BLOCK + 1]))
# A sealed file held open, then evicted: its holder must still read it whole.
@example(ops=[("whole", 0, 0), ("open", 0, 0), ("whole", 1, 0)], budget_chunks=5, size=SMALL)
# A chunk sharing its blocks evicted, then a restart: it must not be sealed as zeros.
@example(ops=[("write", 1, 0), ("write", 1, 1)] + [("write", 0, i) for i in range(4)]
         + [("read", 1, 0), ("read", 1, 1), ("read", 0, 0), ("read", 0, 2), ("read", 0, 3),
            ("write", 2, 0), ("restart", 0, 0), ("whole", 0, 0), ("open", 0, 0)],
         budget_chunks=6, size=5000)
def test_any_sequence_never_serves_wrong_bytes_nor_exceeds_the_budget(ops, budget_chunks, size):
    budget = budget_chunks * size
    # Four files of four chunks; files 2 and 3 share their first chunk's bytes.
    rnd = random.Random(size)
    parts = [[rnd.randbytes(size) for _ in range(4)] for _ in range(4)]
    parts[3][0] = parts[2][0]
    files = []
    for j, ps in enumerate(parts):
        fid = fid_of(f"prop{j}")
        fsize = size * len(ps)
        files.append((fid, b"".join(ps),
                      [(sha(p), p, Spot(fid, i * size, fsize)) for i, p in enumerate(ps)]))
    held: list[tuple[int, bytes]] = []  # descriptors of sealed files, kept open
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        c = open_cache(root, budget)
        try:
            _run_ops(c, root, budget, files, ops, held)
        finally:
            for fd, _ in held:
                os.close(fd)


def _run_ops(c, root, budget, files, ops, held):
    for op, j, i in ops:
        fid, whole, chunks = files[j]
        digest, part, spot = chunks[i]
        if op == "write":
            c.write(digest, part, spot=spot)
        elif op == "whole":  # a file read through: all its chunks, then sealed
            for d, p, sp in chunks:
                c.write(d, p, spot=sp)
            c.seal(fid)
        elif op == "fill":  # from memory we do not own, which may have changed
            data = part if (i + j) % 2 else b"\0" + part[1:]
            c.write(digest, data, xxh=xxhash.xxh3_64_hexdigest(part), spot=spot)
        elif op == "read":
            got = c.read(digest)
            assert got is None or got == part
        elif op == "prefer":
            assert read_back(c, digest, len(part), prefer=spot) in (None, part)
        elif op == "seal":
            if c.seal(fid):
                assert c.complete(fid)
        elif op == "open":
            fd = c.open_sealed(fid)
            if fd is not None:
                held.append((fd, whole))
        elif op == "remove":
            c.remove(digest)
            assert digest not in c
        else:
            c.close()
            c = open_cache(root, budget)
        s = c.stats()
        disk, nfiles = allocated_all(root)
        assert s.used_bytes <= budget
        if len(part) % BLOCK == 0:
            assert disk <= budget + BLOCK * s.chunks
        else:  # a chunk touches 2 partial blocks; a block two evicted chunks shared stays
            assert disk <= budget + 2 * BLOCK * s.chunks + 3 * BLOCK * s.files
        assert s.files == nfiles
        for fd, data in held:  # whatever happened since, a holder sees the whole file
            assert os.pread(fd, len(data), 0) == data
    c.close()


# -- the index compacted at run time --------------------------------------------------------------
@pytest.mark.parametrize("slack", [0, 1, 3])
def test_compacting_the_index_keeps_the_record_of_every_chunk_written(tmp_path, monkeypatch, slack):
    monkeypatch.setattr(diskcache, "COMPACT_SLACK", slack)
    f = FakeFile("compact", 6)
    c = open_cache(tmp_path)
    for i in range(len(f.chunks)):
        f.write(c, i)
        c.remove(f.chunks[i][0])  # churn: index lines that are no live record
        f.write(c, i)
    assert c.seal(f.fid)
    c.close()
    assert len((tmp_path / "index").read_bytes().splitlines()) <= 3 * (len(f.chunks) + 1) + slack
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == len(f.chunks) and c2.stats().sealed_files == 1
    for digest, part, spot in f.chunks:
        assert c2.holds(digest, spot) and c2.read(digest) == part


def test_compacting_the_index_keeps_records_of_writes_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(diskcache, "COMPACT_SLACK", 0)
    files = [FakeFile(f"cf{k}", 8) for k in range(4)]
    c = open_cache(tmp_path)
    errors: list[BaseException] = []

    def writer(f: FakeFile) -> None:
        try:
            f.write(c)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    c.close()
    c2 = open_cache(tmp_path)
    assert c2.stats().chunks == sum(len(f.chunks) for f in files)
    for f in files:
        assert c2.complete(f.fid)


# -- races: a read or write meeting an eviction ---------------------------------------------------
def test_a_read_that_meets_the_eviction_of_its_chunk_is_a_race_not_corruption(tmp_path, monkeypatch):
    f = FakeFile("read-race", 3)
    c = open_cache(tmp_path, budget=3 * C)
    f.write(c)
    other = FakeFile("read-race-other", 3)
    path = data_path(tmp_path, f.fid)
    # Between the lookup and the open, all of f is evicted (its last hole: the file unlinked).
    armed = before_open(monkeypatch, path, lambda: other.write(c), kind="read")
    got = c.read(f.chunks[1][0])
    monkeypatch.undo()
    assert not armed[0] and got is None and not path.exists()
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.read_errors, s.chunks) == (1, 0, 0, 3)
    for digest, part, spot in other.chunks:
        assert c.read(digest) == part


def test_a_read_that_meets_a_hole_punched_under_it_is_a_race_not_corruption(
        tmp_path, monkeypatch):
    f = FakeFile("read-race2", 3)
    c = open_cache(tmp_path, budget=3 * C)
    f.write(c)
    other = FakeFile("read-race2-other", 1)
    digest = f.chunks[0][0]

    def evict_it():  # the read touched chunk 0: make chunk 1 and 2 newer, then evict it
        f.write(c, 1, 2)
        assert c.read(f.chunks[1][0]) and c.read(f.chunks[2][0])
        other.write(c)
        assert not c.holds(digest, f.chunks[0][2])

    path = data_path(tmp_path, f.fid)
    armed = before_open(monkeypatch, path, evict_it, kind="read")
    got = c.read(digest)
    monkeypatch.undo()
    assert not armed[0] and got is None and is_hole(path, 0)
    s = c.stats()
    assert (s.raced, s.corrupt_dropped, s.read_errors, s.chunks) == (1, 0, 0, 3)


def test_a_write_to_a_spot_being_punched_waits_for_the_punch(tmp_path, monkeypatch):
    f = FakeFile("punch-race", 3)
    c = open_cache(tmp_path, budget=3 * C)
    f.write(c)
    digest, part, spot = f.chunks[0]
    other = FakeFile("punch-race-other", 1)
    rewrite = threading.Thread(target=lambda: f.write(c, 0))

    def write_the_spot_again():
        rewrite.start()
        rewrite.join(0.5)
        # Had it written now, the punch that follows would leave a hole under its record.
        assert rewrite.is_alive(), "the write did not wait for the punch"

    armed = before_open(monkeypatch, data_path(tmp_path, f.fid), write_the_spot_again,
                        kind="punch")
    other.write(c)  # evicts chunk 0: its hole is punched under the hook
    monkeypatch.undo()
    rewrite.join()
    assert not armed[0]
    assert c.holds(digest, spot) and c.read(digest) == part
    assert c.stats().corrupt_dropped == 0 and c.stats().used_bytes <= 3 * C


# -- chunks that do not fill whole blocks ---------------------------------------------------------
def test_a_punched_chunk_sharing_its_blocks_is_never_sealed_as_zeros_after_restart(tmp_path):
    # Chunks of 5000 bytes: the middle one shares both its blocks with its neighbours, so
    # its eviction can only zero it (no block is freed) and its range still reads as data.
    size = 5000
    rnd = random.Random(5000)
    parts = [rnd.randbytes(size) for _ in range(3)]
    fid, fsize = fid_of("unaligned"), 3 * size
    chunks = [(sha(p), p, Spot(fid, i * size, fsize)) for i, p in enumerate(parts)]
    c = open_cache(tmp_path, budget=3 * size)
    for digest, part, spot in chunks:
        assert c.write(digest, part, spot=spot)
    c.read(chunks[0][0]), c.read(chunks[2][0])
    other = b"o" * size
    assert c.write(sha(other), other)  # evicts the middle chunk, the least recent
    assert not c.holds(chunks[1][0], chunks[1][2])
    c.remove(sha(other))
    c.close()
    c2 = open_cache(tmp_path, budget=3 * size)
    assert c2.read(chunks[0][0]) == parts[0] and c2.read(chunks[2][0]) == parts[2]
    # Filled as a reader would (each chunk written at its spot unless the cache holds it),
    # then sealed: a seal that finds a bad chunk drops it and the file is filled again.
    for _ in range(2):
        for digest, part, spot in chunks:
            assert c2.write(digest, part, spot=spot)
        if c2.seal(fid):
            break
    fd = c2.open_sealed(fid)
    assert fd is not None
    try:
        assert os.pread(fd, fsize, 0) == b"".join(parts)
    finally:
        os.close(fd)
    assert c2.read(chunks[1][0]) == parts[1]


def _resident(path: Path) -> float:
    """The share of `path`'s pages in the page cache (mincore of a mapping)."""
    import mmap

    import numpy as np

    size = path.stat().st_size
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        pages = (size + BLOCK - 1) // BLOCK
        vec = ctypes.create_string_buffer(pages)
        a = np.frombuffer(mm, dtype=np.uint8)
        assert libc.mincore(ctypes.c_void_p(a.ctypes.data), size, vec) == 0
        del a
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        mm.close()


@pytest.mark.parametrize("into_page_cache", [True, False])
def test_a_seal_for_an_open_leaves_the_checked_pages_for_the_loader(tmp_path, into_page_cache):
    """Sealing a file about to be handed out reads its unchecked chunks through the page
    cache (the loader then maps the pages just checked, not the disk a second time); a
    background seal reads with O_DIRECT and leaves the page cache alone."""
    f = FakeFile("paged", 8)
    c = open_cache(tmp_path)
    for digest, part, spot in f.chunks:  # from memory we do not own: unchecked
        buf = aligned_empty(len(part))
        buf[:] = part
        assert c.write(digest, buf, xxhash.xxh3_64_hexdigest(part), spot)
    path = data_path(tmp_path, f.fid)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident(path) > 0.1:
        pytest.skip("this filesystem keeps the pages cached (no O_DIRECT or DONTNEED here)")
    assert c.seal(f.fid, into_page_cache=into_page_cache)
    share = _resident(path)
    assert share > 0.9 if into_page_cache else share < 0.1
    fd = c.open_sealed(f.fid)
    try:
        assert os.pread(fd, f.fsize, 0) == f.data
    finally:
        os.close(fd)
