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
import xxhash

from conftest import drop_page_cache, needs_fuse, wait_for

from .conftest import (FIGURES, MiB, assert_served, check_daemon, chunk_files,
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
    """Bytes of chunk files under `cache`, from a walk that is not a snapshot: a file
    evicted while we walk may be counted beside the file that replaced it (seen: +2 bytes,
    a tiny chunk). Files gone by the end of the walk are taken back out, so the figure
    never exceeds what existed at once. That can miss an overshoot shorter than a walk;
    the exact invariant (usage <= budget before and after every rename) is tested in
    tests/test_cache.py, this is the system-level check."""
    seen: dict[str, tuple[int, int]] = {}
    for root, _, names in os.walk(cache / "chunks"):
        for n in names:
            p = os.path.join(root, n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            seen[p] = (st.st_ino, st.st_size)
    alive: dict[int, int] = {}  # inode -> size, for inodes still there under a name we saw
    for p, (ino, size) in seen.items():
        try:
            if os.lstat(p).st_ino == ino:
                alive[ino] = size
        except FileNotFoundError:
            pass
    renamed = {ino: size for ino, size in seen.values()
               if ino not in alive and _exists_elsewhere(cache, ino)}
    return sum(alive.values()) + sum(renamed.values())


def _exists_elsewhere(cache, ino: int) -> bool:
    """Whether inode `ino` still exists under another name (a temp file renamed into
    place during the walk): it then counts once."""
    for root, _, names in os.walk(cache / "chunks"):
        for n in names:
            try:
                if os.lstat(os.path.join(root, n)).st_ino == ino:
                    return True
            except FileNotFoundError:
                pass
    return False


class UsageSampler:
    """The most bytes of chunk files seen under a cache dir, sampled every few ms."""

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
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    s = m.status()
    on_disk = sum(f.stat().st_size for f in chunk_files(m.cache_dir))
    assert s["cache_used_bytes"] == on_disk, f"the daemon counts {s['cache_used_bytes']}, disk has {on_disk}"
    for f in chunk_files(m.cache_dir):
        assert xxhash.xxh3_64_hexdigest(f.read_bytes()) == f.name.partition(".")[2], f"torn {f.name}"
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
