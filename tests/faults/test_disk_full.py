"""A cache disk that fills: the cache dir is a 16 MiB tmpfs (mounted by the `tmpfs`
fixture, always unmounted) under a model of 40 MiB. With a budget larger than the disk,
writes meet ENOSPC; with a smaller one, eviction must keep usage within the budget at
every moment; and another program may fill the disk while we serve. Reads stay correct
throughout, the daemon's accounting matches the disk, and it stays alive and within its
memory."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from conftest import drop_page_cache, needs_fuse, wait_for

from .conftest import (BLOCK, FIGURES, MiB, assert_served, check_cache, check_daemon,
                       publish_dir, unique)

pytestmark = needs_fuse
DISK = 16 * MiB
MEMORY = 8 * MiB


@pytest.fixture(scope="module")
def forty_mib(seaweed, tmp_path_factory) -> dict:
    src = tmp_path_factory.mktemp("diskfull-src") / "m"
    src.mkdir()
    rng = random.Random(3)
    files = {f"part-{i}.bin": rng.randbytes(10 * MiB + i) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    url = f"s3://models/{unique('diskfull')}/m"
    publish_dir(src, url, seaweed.endpoint)
    return {"url": url, "files": files}


def _snapshot_bytes(cache) -> int:
    """Bytes the data files under `cache` hold on disk (allocated blocks), from a walk
    that is not a snapshot: a hole punched while we walk may be counted beside the chunk
    written into the room it made. So every file is measured twice, all once and then all
    again, and counted at the lesser of its two sizes: an overshoot shorter than a walk can
    be missed; the exact invariant (usage <= budget before and after every write of chunk
    bytes) is tested in tests/test_cache.py, this is the system-level check."""
    first: dict[str, int] = {}
    for root, _, names in os.walk(cache / "files"):
        for n in names:
            p = os.path.join(root, n)
            try:
                first[p] = os.lstat(p).st_blocks * 512
            except FileNotFoundError:
                continue
    total = 0
    for p, size in first.items():
        try:
            total += min(size, os.lstat(p).st_blocks * 512)
        except FileNotFoundError:
            pass
    return total


class UsageSampler:
    """The most bytes of data files seen under a cache dir, sampled every few ms."""

    def __init__(self, cache) -> None:
        self.cache, self.peak, self._stop = cache, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _snapshot_bytes(self.cache))
            time.sleep(0.003)

    def __enter__(self) -> "UsageSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def read_all(m, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert_served(m.path / name, data)
    drop_page_cache()


def accounting_matches_disk(m) -> dict:
    """With the daemon idle: what it counts is what the disk holds (valid chunks, no data
    outside them: `check_cache`), and the allocated blocks are those chunks' (rounded up to
    whole blocks at their ends: at most one block per data file more)."""
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    s = m.status()
    found = check_cache(m.cache_dir)
    assert (s["cache_used_bytes"], s["cache_chunks"]) == (found.bytes, found.chunks), \
        f"the daemon counts {s['cache_used_bytes']} bytes in {s['cache_chunks']} chunks, disk has {found}"
    assert found.bytes <= found.allocated <= found.bytes + s["cache_files"] * BLOCK, found
    return s


def test_a_disk_smaller_than_the_budget(forty_mib, seaweed, tmpfs, mount_factory):
    cache = tmpfs(f"{DISK // MiB}m")
    m = mount_factory(forty_mib["url"], seaweed.endpoint, "--memory-size", str(MEMORY),
                      "--cache-size", "64MiB", cache_dir=cache)
    for _ in range(2):
        read_all(m, forty_mib["files"])
    FIGURES.ran("disk-full rounds", 2)
    s = accounting_matches_disk(m)
    st = os.statvfs(cache)
    assert (st.f_blocks - st.f_bfree) * st.f_frsize <= DISK
    assert s["cache_used_bytes"] <= DISK
    check_daemon(m, "cache disk full", memory=MEMORY)
    FIGURES.survived("cache disk full")


def test_another_program_fills_the_disk(forty_mib, seaweed, tmpfs, mount_factory):
    cache = tmpfs(f"{DISK // MiB}m")
    m = mount_factory(forty_mib["url"], seaweed.endpoint, "--memory-size", str(MEMORY),
                      "--cache-size", "12MiB", cache_dir=cache)
    files = dict(list(forty_mib["files"].items())[:2])
    read_all(m, files)
    hog = cache / "hog"
    with open(hog, "wb") as f:  # every free byte
        try:
            while True:
                f.write(b"\xaa" * MiB)
                f.flush()
        except OSError:
            pass
    try:
        for _ in range(2):
            read_all(m, forty_mib["files"])
        FIGURES.ran("disk-full rounds", 2)
        assert m.alive()
    finally:
        hog.unlink()
    read_all(m, forty_mib["files"])
    accounting_matches_disk(m)
    check_daemon(m, "cache disk filled by another program", memory=MEMORY)
    FIGURES.survived("cache disk filled by another program")


def test_usage_never_exceeds_the_budget(forty_mib, seaweed, tmpfs, mount_factory):
    cache = tmpfs(f"{DISK // MiB}m")
    budget = 6 * MiB
    m = mount_factory(forty_mib["url"], seaweed.endpoint, "--memory-size", str(MEMORY),
                      "--cache-size", str(budget), cache_dir=cache)
    with UsageSampler(cache) as usage:
        for _ in range(2):
            read_all(m, forty_mib["files"])
        s = accounting_matches_disk(m)
    FIGURES.ran("disk-full rounds", 2)
    check_daemon(m, "disk budget", memory=MEMORY)
    assert s["cache_used_bytes"] <= budget
    assert usage.peak <= budget, f"{usage.peak / MiB:.2f} MiB on disk against a budget of {budget / MiB:.0f} MiB"
    FIGURES.survived("disk budget kept")
