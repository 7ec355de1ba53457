"""Cache corruption of every kind, with the daemon stopped (found by the start-up scan)
and while it runs (found on read-back). The cache keeps each file whole in one data file
(docs/FORMAT.md "Disk cache"), so damage comes at two levels: inside a chunk of a data
file (a bit flip, another chunk's bytes, zeros, a hole; at start-up also a write torn by a
crash: data no record names), and to a data file itself (truncated, zero length, an extra
byte, another file's bytes, a directory, a FIFO or a symlink in its place, wrong
permissions); at start-up also foreign and misfiled files and a torn index line. Each
kind hits a file of its own. Every read returns the right bytes (refetched), the cache
heals (each file ends up a valid, sealed data file again, nothing else left), the daemon
stays alive and within its memory and disk budgets."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import drop_page_cache, needs_fuse, p2pfs_cmd, wait_for

from .conftest import (FIGURES, MiB, assert_served, cache_bytes, check_cache, check_daemon,
                       data_files, index_records, publish_dir, unique)

pytestmark = needs_fuse
CHUNK = 256 * 1024
FILE_SIZE = 2 * CHUNK + 1234  # three chunks, the last one short
BUDGET = 64 * MiB

#: Damage inside a chunk (the middle one) of a data file.
IN_CHUNK = ["bitflip", "another_chunk", "zeros", "hole"]
#: Damage to a data file as a whole.
WHOLE = ["truncated", "zero_length", "extra_byte", "another_file", "directory", "fifo",
         "symlink_to_another", "symlink_dangling", "symlink_dev_zero", "unreadable_mode"]
KINDS = IN_CHUNK + WHOLE
#: Only a crash leaves these: the start-up test adds them.
AT_START = ["torn_write"]
#: Never damaged: the bytes of another file, for the kinds that need them.
INTACT = "intact"


@pytest.fixture(scope="module")
def corruptible(seaweed, tmp_path_factory) -> dict:
    """A model of one file per kind of damage, and one never damaged, each of three
    chunks of 256 KiB (the last one short)."""
    src = tmp_path_factory.mktemp("corrupt-src") / "m"
    src.mkdir()
    rng = random.Random(99)
    files = {f"{kind}.bin": rng.randbytes(FILE_SIZE) for kind in KINDS + AT_START + [INTACT]}
    for name, data in files.items():
        (src / name).write_bytes(data)
    url = f"s3://models/{unique('corrupt')}/m"
    publish_dir(src, url, seaweed.endpoint, chunk_size="256KiB")
    return {"url": url, "files": files}


def local_copies(cache: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Each file's data file in the cache (told by its bytes)."""
    by_head = {data[:64]: name for name, data in files.items()}
    out = {}
    for f in data_files(cache):
        with open(f, "rb") as fh:
            name = by_head.get(fh.read(64))
        if name is not None:
            out[name] = f
    assert sorted(out) == sorted(files), f"no local copy of {sorted(set(files) - set(out))}"
    return out


def middle_chunk(cache: Path, path: Path) -> tuple[int, int]:
    """(offset, size) of the middle chunk of a data file, from the index."""
    spots = sorted((r.at, r.size) for r in index_records(cache) if r.path == path)
    assert len(spots) == 3, spots
    return spots[1]


def punch(path: Path, at: int, size: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(at), "-l", str(size),
                    str(path)], check=True, capture_output=True, timeout=30)


def corrupt(cache: Path, path: Path, kind: str, other: Path) -> None:
    """Damage one data file in one way (`other`: another file's data file)."""
    if kind in IN_CHUNK or kind == "torn_write":
        at, size = middle_chunk(cache, path)
        if kind == "hole":
            punch(path, at, size)
            return
        if kind == "torn_write":  # the chunk's bytes landed, its record did not
            index = cache / "index"
            lines = index.read_bytes().splitlines(keepends=True)
            fid = path.name.encode()
            index.write_bytes(b"".join(line for line in lines if not (
                line.startswith(b"c " + fid + b" " + str(at).encode() + b" ")
                or line == b"s " + fid + b"\n")))
            return
        with open(path, "r+b") as fh:
            if kind == "bitflip":
                fh.seek(at + size // 2)
                b = fh.read(1)[0]
                fh.seek(at + size // 2)
                fh.write(bytes([b ^ 0x10]))
            elif kind == "another_chunk":
                first = os.pread(fh.fileno(), size, 0)
                os.pwrite(fh.fileno(), first, at)
            elif kind == "zeros":
                os.pwrite(fh.fileno(), bytes(size), at)
            else:
                raise ValueError(kind)
        return
    raw = path.read_bytes()
    if kind == "truncated":
        os.truncate(path, len(raw) // 2)
    elif kind == "zero_length":
        os.truncate(path, 0)
    elif kind == "extra_byte":
        with open(path, "ab") as fh:
            fh.write(b"\0")
    elif kind == "another_file":
        shutil.copyfile(other, path)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(raw)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "symlink_to_another":
        path.unlink()
        path.symlink_to(other)
    elif kind == "symlink_dangling":
        path.unlink()
        path.symlink_to("/nonexistent/chunk")
    elif kind == "symlink_dev_zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif kind == "unreadable_mode":
        path.chmod(0)
    else:
        raise ValueError(kind)


def damage(cache: Path, files: dict[str, bytes], kinds: list[str]) -> None:
    copies = local_copies(cache, files)
    for kind in kinds:
        corrupt(cache, copies[f"{kind}.bin"], kind, copies[f"{INTACT}.bin"])


def assert_healed(m, cache: Path, files: dict[str, bytes]) -> None:
    """Every file is local again: one valid data file each, sealed, the daemon counting
    what the disk holds, nothing else left under `files/`."""
    wait_for(lambda: m.status()["cache_sealed_files"] == len(files), timeout=30,
             what="every file sealed again")
    found = check_cache(cache)
    assert found.chunks == 3 * len(files), f"{found.chunks} valid chunks, want {3 * len(files)}"
    assert len(data_files(cache)) == len(files)
    s = m.status()
    assert (s["cache_chunks"], s["cache_used_bytes"]) == (found.chunks, found.bytes)
    for name, f in local_copies(cache, files).items():
        assert f.read_bytes() == files[name], f"{name}: its local copy is not its bytes"


def _prefetched(m) -> None:
    p2pfs_cmd("prefetch", str(m.path))


def test_corruption_found_at_start_up(corruptible, seaweed, mount_factory, tmp_path):
    files = corruptible["files"]
    cache = tmp_path / "cache"
    args = ("--memory-size", "32MiB", "--cache-size", str(BUDGET))
    m = mount_factory(corruptible["url"], seaweed.endpoint, *args, cache_dir=cache)
    _prefetched(m)
    wait_for(lambda: m.status()["cache_sealed_files"] == len(files), timeout=30, what="files sealed")
    m.stop()
    damage(cache, files, KINDS + AT_START)
    sub = data_files(cache)[0].parent
    (sub / "not-a-data-file").write_bytes(b"foreign")
    (sub / (sub.name + "0" * 62)).write_bytes(b"a data file no record names")
    misfiled = cache / "files" / "zz" / data_files(cache)[-1].name
    misfiled.parent.mkdir()
    misfiled.write_bytes(b"misfiled")
    (cache / "files" / "not-a-directory").write_bytes(b"foreign")
    with open(cache / "index", "ab") as ix:
        ix.write(b"c " + b"e" * 64 + b" 0 100 100 " + b"f" * 64)  # torn by a crash
    extra = 5

    m2 = mount_factory(corruptible["url"], seaweed.endpoint, *args, cache_dir=cache,
                       mountpoint=m.path)
    # What the scan left (nothing read yet): each damaged data file removed, the torn write
    # punched out, nothing foreign, the budget counting what the disk holds. Bad bytes in
    # a chunk stay until a read-back finds them.
    found = check_cache(cache, xxh3=False)
    s = m2.status()
    assert (s["cache_chunks"], s["cache_used_bytes"]) == (found.chunks, found.bytes)
    kept = ("another_file", "unreadable_mode")  # regular, of the right size: bytes checked on read
    assert len(data_files(cache)) == len(files) - len(WHOLE) + len(kept)
    for mode in ("buffered", "direct"):
        for name, data in files.items():
            assert_served(m2.path / name, data, mode=mode)
        drop_page_cache()
    FIGURES.ran("cache corruptions (at start-up)", len(KINDS + AT_START) + extra)
    wait_for(lambda: m2.status()["writeback_pending"] == 0, what="write-back")
    s = check_daemon(m2, "cache corruption at start-up")
    assert s["bytes_by_source"].get("origin", 0) > 0, "nothing was refetched"
    assert cache_bytes(cache) <= BUDGET
    FIGURES.survived("cache corruption", len(KINDS + AT_START) + extra)
    _prefetched(m2)  # every file local again
    assert_healed(m2, cache, files)


def test_corruption_found_on_read_back(corruptible, seaweed, mount_factory, tmp_path):
    """The daemon runs; data files are damaged under it. Its memory cache holds 4 chunks:
    the files damaged are read before the others, so what they had in memory is gone by
    the time they are damaged, and their chunks are read back from disk."""
    files = corruptible["files"]
    cache = tmp_path / "cache"
    m = mount_factory(corruptible["url"], seaweed.endpoint, "--memory-size", "1MiB",
                      "--cache-size", str(BUDGET), "--read-timeout", "5", cache_dir=cache)
    _prefetched(m)
    live = [k for k in KINDS if k not in ("symlink_dev_zero", "unreadable_mode")]
    order = [f"{k}.bin" for k in live] + [n for n in files if n[:-4] not in live]
    for name in order:
        assert_served(m.path / name, files[name])
    wait_for(lambda: m.status()["cache_sealed_files"] == len(files), timeout=30, what="files sealed")
    damage(cache, files, live)
    drop_page_cache()
    for _ in range(2):
        for name in order:
            assert_served(m.path / name, files[name], timeout=60)
        drop_page_cache()
    s = m.status()
    # Each damaged file is found once: dropped whole (it was sealed) at its first bad chunk.
    assert s["cache_corrupt_dropped"] == len(live), s
    FIGURES.ran("cache corruptions (while serving)", len(live))
    check_daemon(m, "cache corruption while serving", memory=1 * MiB)
    FIGURES.survived("cache corruption", len(live))
    _prefetched(m)
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    assert_healed(m, cache, files)


def test_cache_modes_are_tightened(corruptible, seaweed, mount_factory, tmp_path):
    """A cache left world-readable (or an old p2pfs's 0644/0755) is made private on start:
    the cache must not bypass the mount's file permissions."""
    cache = tmp_path / "cache"
    m = mount_factory(corruptible["url"], seaweed.endpoint, cache_dir=cache)
    _prefetched(m)
    m.stop()
    for root, dirs, names in os.walk(cache):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777)
        for n in names:
            if not n.endswith(".sock"):
                os.chmod(os.path.join(root, n), 0o666)
    m2 = mount_factory(corruptible["url"], seaweed.endpoint, cache_dir=cache, mountpoint=m.path)
    for name, data in corruptible["files"].items():
        assert_served(m2.path / name, data)
    FIGURES.ran("cache corruptions (modes)")
    assert len(data_files(cache)) == len(corruptible["files"])
    for f in [*data_files(cache), cache / "index", cache / "format"]:
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is {stat.filemode(f.stat().st_mode)}"
    for d in {f.parent for f in data_files(cache)} | {cache / "files"}:
        assert d.stat().st_mode & 0o077 == 0, f"{d} is {stat.filemode(d.stat().st_mode)}"
    assert cache.stat().st_mode & 0o066 == 0  # 0711: others may pass through, not list
    check_daemon(m2, "cache modes")
    FIGURES.survived("cache corruption")
