"""kill -9 of the daemon at random points of a cold read, of write-back and of a prefetch.
The daemon is restarted on the same cache dir over the dead mount each time (the stale
mount is cleared as after any crash). Bytes a reader got before the kill are a correct
prefix of the file; every byte served after the restart is correct; once the new daemon has
scanned the cache, it holds only valid chunks: each recorded chunk's bytes match its xxh3,
and the data of writes torn by the kill (no record names it) are punched out."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import drop_page_cache, needs_fuse, wait_for

from .conftest import (FIGURES, MiB, READER, assert_served, check_cache, check_daemon, publish_dir,
                       unique)

pytestmark = needs_fuse
SIZE = 64 * MiB + 777
SEED = 20261201


@pytest.fixture(scope="module")
def big_model(seaweed, tmp_path_factory) -> dict:
    src = tmp_path_factory.mktemp("kill9-src") / "m"
    src.mkdir()
    data = random.Random(SEED).randbytes(SIZE)
    (src / "big.bin").write_bytes(data)
    url = f"s3://models/{unique('kill9')}/m"
    publish_dir(src, url, seaweed.endpoint)
    return {"url": url, "data": data}


def kill9(m) -> None:
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: not m.alive(), timeout=10, what="the killed daemon to exit")
    m.pid = 0  # nothing of ours to stop any more; the stale mount goes with the next mount


def assert_cache_valid(cache, m) -> int:
    """What the scan left: valid chunks only, no torn data (`check_cache`), all counted by
    the daemon."""
    found = check_cache(cache)
    s = m.status()
    assert (s["cache_chunks"], s["cache_used_bytes"]) == (found.chunks, found.bytes)
    return found.chunks


def test_kill9_during_cold_reads(big_model, seaweed, mount_factory, tmp_path):
    """Six rounds; even ones on a new cache (all cold), odd ones on what the round before
    left (a mix of disk hits, torn write-back and fetches). The kill comes at a random
    point of the read: a cold read of the file takes ~0.25 s here."""
    rng = random.Random(SEED)
    data = big_model["data"]
    args = ("--memory-size", "32MiB")
    mnt, m = None, None
    midway = 0
    for i in range(6):
        cache = tmp_path / f"cache{i // 2}"
        m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=cache, mountpoint=mnt)
        mnt = m.path
        drop_page_cache()
        copy = tmp_path / f"partial{i}"
        reader = subprocess.Popen([sys.executable, str(READER), str(mnt / "big.bin"), "buffered", "0",
                                   "-1", str(copy)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader.stdout.readline()  # it is about to open the file
        time.sleep(rng.uniform(0, 0.3))
        kill9(m)
        reader.communicate(timeout=30)
        got = copy.read_bytes()
        assert got == data[:len(got)], f"round {i}: a wrong byte before the kill"
        midway += len(got) < len(data)
        FIGURES.survived("kill -9 during a cold read")
        m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=cache, mountpoint=mnt)
        assert_cache_valid(cache, m)
        assert_served(mnt / "big.bin", data)
        if i % 2 == 0:
            drop_page_cache()
        m.stop()
    FIGURES.ran("kill -9 rounds", 6)
    print(f"{midway} of 6 kills landed before the reader had the whole file")
    assert midway >= 2, "the kills came too late to test anything: make the read longer"
    m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=tmp_path / "cache0",
                      mountpoint=mnt)
    assert_served(mnt / "big.bin", data)
    check_daemon(m, "kill -9 during cold reads")


def test_kill9_during_writeback_and_prefetch(big_model, seaweed, mount_factory, tmp_path):
    from conftest import p2pfs_cmd

    rng = random.Random(SEED + 1)
    data = big_model["data"]
    args = ("--memory-size", "32MiB")
    mnt = None
    for i in range(4):
        cache = tmp_path / f"cache{i}"
        m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=cache, mountpoint=mnt)
        mnt = m.path
        if i % 2 == 0:  # write-back of what a reader fetched
            assert_served(mnt / "big.bin", data)
            time.sleep(rng.uniform(0, 0.2))
            what = "kill -9 during write-back"
        else:  # an explicit prefetch writes every chunk to disk
            pre = subprocess.Popen([sys.executable, "-m", "p2pfs", "prefetch", str(mnt / "big.bin")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 0.5))
            what = "kill -9 during a prefetch"
        kill9(m)
        if i % 2:
            pre.wait(30)
        m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=cache, mountpoint=mnt)
        assert_cache_valid(cache, m)
        drop_page_cache()
        assert_served(mnt / "big.bin", data)
        FIGURES.survived(what)
        m.stop()
    FIGURES.ran("kill -9 rounds", 4)
    m = mount_factory(big_model["url"], seaweed.endpoint, *args, cache_dir=tmp_path / "cache0",
                      mountpoint=mnt)
    p2pfs_cmd("prefetch", str(mnt / "big.bin"))
    assert_served(mnt / "big.bin", data)
    check_daemon(m, "kill -9 during write-back")
