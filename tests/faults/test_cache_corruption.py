"""Cache corruption of every kind, with the daemon stopped (found by the start-up scan)
and while it runs (found on read-back): bit flips, truncation, zero length, another
chunk's bytes, extra bytes, zeros, a directory, a FIFO or a symlink in place of a chunk
file, wrong permissions, leftover temp files and foreign files. Every read returns the
right bytes (refetched), the cache heals (each chunk ends up a valid regular file
again), the daemon stays alive and within its memory and disk budgets."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
import xxhash

from conftest import drop_page_cache, needs_fuse, p2pfs_cmd, wait_for

from .conftest import (FIGURES, MiB, assert_served, cache_bytes, check_daemon, chunk_files,
                       publish_dir, unique)

pytestmark = needs_fuse
CHUNK = 256 * 1024
NCHUNKS = 12
BUDGET = 64 * MiB


@pytest.fixture(scope="module")
def corruptible(seaweed, tmp_path_factory) -> dict:
    """A model of one file in NCHUNKS chunks of 256 KiB (the last one short)."""
    src = tmp_path_factory.mktemp("corrupt-src") / "m"
    src.mkdir()
    data = random.Random(99).randbytes((NCHUNKS - 1) * CHUNK + 1234)
    (src / "model.bin").write_bytes(data)
    url = f"s3://models/{unique('corrupt')}/m"
    publish_dir(src, url, seaweed.endpoint, chunk_size="256KiB")
    return {"url": url, "data": data}


def _other(path: Path, files: list[Path]) -> Path:
    return next(f for f in files if f != path and stat.S_ISREG(f.lstat().st_mode) and f.lstat().st_size)


def corrupt(path: Path, kind: str, files: list[Path]) -> None:
    """Damage one chunk file of the cache in one way."""
    raw = path.read_bytes()
    if kind == "bitflip":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0x10
        path.write_bytes(bytes(b))
    elif kind == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "zero_length":
        path.write_bytes(b"")
    elif kind == "another_chunk":
        path.write_bytes(_other(path, files).read_bytes())
    elif kind == "extra_byte":
        path.write_bytes(raw + b"\0")
    elif kind == "zeros":
        path.write_bytes(bytes(len(raw)))
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(raw)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "symlink_to_another":
        other = _other(path, files)
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


KINDS = ["bitflip", "truncated", "zero_length", "another_chunk", "extra_byte", "zeros",
         "directory", "fifo", "symlink_to_another", "symlink_dangling", "symlink_dev_zero",
         "unreadable_mode"]
assert len(KINDS) == NCHUNKS


def assert_healed(cache: Path, want: int) -> None:
    """Every chunk file is a regular file whose bytes match the xxh3 in its name, and
    nothing else is left in the chunk directories."""
    good = 0
    for sub in (cache / "chunks").iterdir():
        for f in sub.iterdir():
            st = f.lstat()
            assert stat.S_ISREG(st.st_mode), f"{f.name}: {stat.filemode(st.st_mode)} left in the cache"
            assert not f.name.startswith(".tmp"), f"temp file {f.name} left in the cache"
            assert xxhash.xxh3_64_hexdigest(f.read_bytes()) == f.name.partition(".")[2], \
                f"{f.name}: bytes do not match the name"
            good += 1
    assert good == want, f"{good} valid chunk files, want {want}"


def _prefetched(m) -> None:
    p2pfs_cmd("prefetch", str(m.path / "model.bin"))


def test_corruption_found_at_start_up(corruptible, seaweed, mount_factory, tmp_path):
    cache = tmp_path / "cache"
    args = ("--memory-size", "32MiB", "--cache-size", str(BUDGET))
    m = mount_factory(corruptible["url"], seaweed.endpoint, *args, cache_dir=cache)
    _prefetched(m)
    m.stop()
    files = chunk_files(cache)
    assert len(files) == NCHUNKS
    for f, kind in zip(files, KINDS):
        corrupt(f, kind, files)
    sub = files[0].parent
    (sub / f".tmp.{'0' * 64}.1234").write_bytes(b"left by a crash")
    (sub / "not-a-chunk").write_bytes(b"foreign")
    (cache / "chunks" / "zz").mkdir()
    (cache / "chunks" / "zz" / ("f" * 64 + "." + "0" * 16)).write_bytes(b"misfiled")

    m2 = mount_factory(corruptible["url"], seaweed.endpoint, *args, cache_dir=cache,
                       mountpoint=m.path)
    for mode in ("buffered", "direct"):
        assert_served(m2.path / "model.bin", corruptible["data"], mode=mode)
        drop_page_cache()
    FIGURES.ran("cache corruptions (at start-up)", len(KINDS) + 3)
    wait_for(lambda: m2.status()["writeback_pending"] == 0, what="write-back")
    s = check_daemon(m2, "cache corruption at start-up")
    assert s["bytes_by_source"].get("origin", 0) > 0, "nothing was refetched"
    assert cache_bytes(cache) <= BUDGET
    FIGURES.survived("cache corruption", len(KINDS) + 3)
    _prefetched(m2)  # every chunk local again
    assert_healed(cache, NCHUNKS)


def test_corruption_found_on_read_back(corruptible, seaweed, mount_factory, tmp_path):
    """The daemon runs; chunk files are damaged under it. Its memory cache holds 4 of the 12
    chunks, so the other 8 are read back from disk."""
    cache = tmp_path / "cache"
    m = mount_factory(corruptible["url"], seaweed.endpoint, "--memory-size", "1MiB",
                      "--cache-size", str(BUDGET), "--read-timeout", "5", cache_dir=cache)
    _prefetched(m)
    assert_served(m.path / "model.bin", corruptible["data"])
    files = chunk_files(cache)
    assert len(files) == NCHUNKS
    # The file's first chunks are the least recently used: out of memory by now.
    order = sorted(files, key=lambda f: corruptible["data"].find(_first_bytes(f)))
    live = ["bitflip", "truncated", "zero_length", "another_chunk", "zeros", "directory", "fifo",
            "symlink_to_another"]
    for f, kind in zip(order, live):
        corrupt(f, kind, files)
    drop_page_cache()
    for _ in range(2):
        assert_served(m.path / "model.bin", corruptible["data"], timeout=60)
        drop_page_cache()
    FIGURES.ran("cache corruptions (while serving)", len(live))
    check_daemon(m, "cache corruption while serving", memory=1 * MiB)
    FIGURES.survived("cache corruption", len(live))
    _prefetched(m)
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    assert_healed(cache, NCHUNKS)


def _first_bytes(f: Path) -> bytes:
    with open(f, "rb") as fh:
        return fh.read(64)


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
    assert_served(m2.path / "model.bin", corruptible["data"])
    FIGURES.ran("cache corruptions (modes)")
    for f in chunk_files(cache):
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is {stat.filemode(f.stat().st_mode)}"
        assert f.parent.stat().st_mode & 0o077 == 0, f"{f.parent} is {stat.filemode(f.parent.stat().st_mode)}"
    assert (cache / "chunks").stat().st_mode & 0o077 == 0
    check_daemon(m2, "cache modes")
    FIGURES.survived("cache corruption")
