"""The object store stalled (every SeaweedFS process SIGSTOPped: connections open, no
byte ever comes) and refusing (stopped: connection refused). Cached data keeps being
served; every read of data that is not local fails with EIO within read_timeout plus
EIO_SLACK_S, whatever kind of reader asks (O_DIRECT, buffered read(2) as cat does, mmap
page faults, which see SIGBUS); status answers throughout; once the store is back, reads
recover without a remount. Runs against a SeaweedFS of its own (private_seaweed), so
stopping it disturbs no other test."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import time

import pytest

from conftest import drop_page_cache, needs_fuse, wait_for

from .conftest import (EIO_SLACK_S, FIGURES, MiB, assert_served, check_daemon, publish_dir,
                       read_file, stalled, status_within, wait_serving)

pytestmark = needs_fuse
READ_TIMEOUT = 3.0
BOUND = READ_TIMEOUT + EIO_SLACK_S


@pytest.fixture(scope="module")
def outage_model(private_seaweed, tmp_path_factory) -> dict:
    src = tmp_path_factory.mktemp("outage-src") / "m"
    src.mkdir()
    rng = random.Random(5)
    files = {"cached.bin": rng.randbytes(2 * MiB + 11), "cold.bin": rng.randbytes(16 * MiB + 5)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    url = "s3://faults/outage"
    publish_dir(src, url, private_seaweed.endpoint)
    return {"url": url, "files": files}


@contextlib.contextmanager
def outage(server, kind: str):
    """The store stalled or refusing (crashed: SIGKILL) for the duration; always back, and
    serving, after."""
    if kind == "stalled":
        with stalled(server):
            yield
        return
    proc, server.proc = server.proc, None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    try:
        yield
    finally:
        server.start()
        wait_serving(server)


def failing_read(path, mode: str, offset: int) -> str | float:
    """A read that cannot be served: its latency if it failed as it should (EIO, or SIGBUS
    for mmap), else what went wrong."""
    r = read_file(path, mode=mode, offset=offset, length=MiB, timeout=BOUND * 4 + 10)
    if r.hung:
        return f"a {mode} read hung"
    if r.ok:
        return f"a {mode} read of data the store cannot give succeeded"
    if not (r.errno == errno.EIO or mode == "mmap" and r.signal == signal.SIGBUS):
        return f"a {mode} read failed with errno {r.errno}, signal {r.signal}"
    return r.seconds


def recovered(path, data: bytes, timeout: float = 45.0) -> None:
    """Reads succeed again (a restarted weed answers 500 for a while; fail-fast may hold
    for a moment): retry until they do, then check the bytes."""
    deadline = time.monotonic() + timeout
    while True:
        r = read_file(path, timeout=60)
        if r.ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.ok, f"no recovery within {timeout}s (errno {r.errno})"
    assert_served(path, data)


def _step(results: dict, name: str, fn) -> None:
    """Run one measured step; keep its failure for the test that asserts on it."""
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - reported by the test that owns the step
        results[name] = AssertionError(f"{name}: {exc}")


@pytest.fixture(scope="module", params=["stalled", "refusing"])
def outage_run(request, outage_model, private_seaweed, tmp_path_factory) -> dict:
    """One outage of each kind, measured once: a mount with its cache warm for cached.bin,
    then the store stalled or refusing while cached data is read, cold data is read by
    each kind of reader and status is asked; then the store back and a cold read again.
    The tests below assert on what was found."""
    from conftest import Mount

    kind = request.param
    base = tmp_path_factory.mktemp(f"outage-{kind}")
    (base / "mnt").mkdir()
    m = Mount(outage_model["url"], base / "mnt", base / "cache", private_seaweed.endpoint,
              ["--read-timeout", str(READ_TIMEOUT), "--memory-size", "32MiB"]).start()
    files = outage_model["files"]
    res: dict = {"kind": kind, "mount": m}
    try:
        assert_served(m.path / "cached.bin", files["cached.bin"])
        wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
        with outage(private_seaweed, kind):
            drop_page_cache()
            _step(res, "cached", lambda: [assert_served(m.path / "cached.bin", files["cached.bin"], mode=mode)
                                          for mode in ("buffered", "direct", "mmap")])
            for mode, off in (("direct", 0), ("buffered", 5), ("mmap", 10)):
                res.setdefault(mode, []).append(failing_read(m.path / "cold.bin", mode, off * MiB))
            _step(res, "status", lambda: status_within(m))
            res["alive"] = m.alive()
        FIGURES.ran(f"store {kind} rounds")
        _step(res, "recovery", lambda: recovered(m.path / "cold.bin", files["cold.bin"]))
        _step(res, "daemon", lambda: check_daemon(m, f"store {kind}"))
        for mode in ("direct", "buffered", "mmap"):
            for t in res[mode]:
                if isinstance(t, float):
                    FIGURES.eio_latency(f"store {kind}, {mode} read", t, BOUND)
        yield res
    finally:
        m.stop()


def _ok(res: dict, step: str):
    value = res[step]
    if isinstance(value, BaseException):
        raise value
    return value


def test_cached_data_is_served_during_an_outage(outage_run):
    _ok(outage_run, "cached")
    FIGURES.survived(f"store {outage_run['kind']}: cached data served")


def test_direct_reads_fail_within_the_bound(outage_run):
    for t in outage_run["direct"]:
        assert isinstance(t, float), t
        assert t <= BOUND, f"store {outage_run['kind']}: an O_DIRECT read failed after {t:.1f}s (bound {BOUND}s)"
    FIGURES.survived(f"store {outage_run['kind']}: bounded EIO", len(outage_run["direct"]))


def test_status_answers_and_the_daemon_lives_through_an_outage(outage_run):
    assert outage_run["alive"]
    _ok(outage_run, "status")
    _ok(outage_run, "daemon")


def test_reads_recover_once_the_store_is_back(outage_run):
    _ok(outage_run, "recovery")
    FIGURES.survived(f"store {outage_run['kind']}: recovered")


def test_every_kind_of_reader_sees_the_bound(outage_run):
    """cat (buffered read(2): the kernel re-issues a failed read-ahead) and mmap (page
    faults, then SIGBUS) must see read_timeout too, not a multiple of it."""
    for mode in ("buffered", "mmap"):
        for t in outage_run[mode]:
            assert isinstance(t, float), t
            assert t <= BOUND, f"store {outage_run['kind']}: a {mode} read failed after {t:.1f}s (bound {BOUND}s)"
    FIGURES.survived(f"store {outage_run['kind']}: bounded EIO", 2)
