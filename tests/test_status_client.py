"""`p2pfs status` against a fake daemon: a unix socket that answers badly on purpose.

Every bad answer (garbled, empty, not an object, `{"ok": false}`, none at all within the
timeout, no listener) must be one line on stderr and exit 1, never a traceback. The CLI
finds the socket through the mountpoint's xattr, which a plain directory can carry too,
so the real command runs end to end here without FUSE.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from p2pfs.cli import ask_status, format_status
from p2pfs.errors import P2PFSError

XATTR = "user.p2pfs.control"


class FakeDaemon:
    """Answers each connection with `answer` (bytes), or holds it open without a word."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answer: bytes | None = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                conn.recv(65536)
            except OSError:
                pass
            if self.answer is None:
                self._held.append(conn)  # silent: the client has to give up by itself
                continue
            try:
                conn.sendall(self.answer)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._sock.close()
        for c in self._held:
            c.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "ctl.sock")
    yield d
    d.close()


@pytest.fixture
def fake_mount(tmp_path: Path, daemon: FakeDaemon) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        os.setxattr(mnt, XATTR, str(daemon.path).encode())
    except OSError as exc:
        pytest.skip(f"this filesystem takes no user xattrs ({exc.strerror})")
    return mnt


GOOD = {"ok": True, "mountpoint": "/m", "source": "s3://b/p", "pid": 7, "uptime_s": 1.0,
        "models": [{"path": "minilm", "digest": "d"}], "model_problems": [],
        "cache_dir": "/c", "cache_used_bytes": 3 << 20, "cache_budget_bytes": 100 << 30,
        "cache_chunks": 3, "cache_evicted_chunks": 0, "cache_corrupt_dropped": 0,
        "memory_cache_bytes": 1 << 20, "hit_ratio": 0.5, "hits": {"memory": 184, "disk": 2},
        "misses": 3, "bytes_by_source": {"disk": 2 << 20, "origin": 3 << 20},
        "origin_requests": 2, "fetch_latency_p50_s": 0.05, "fetch_latency_p99_s": 0.1,
        "in_flight_chunks": 0, "errors": {"eio": 1}, "writeback_done": 3,
        "writeback_pending": 0, "writeback_dropped": 0, "metrics_url": None}

BAD = [
    (b"\x00garbage\n", "garbled answer"),
    (b"{\"ok\": tru", "garbled answer"),
    (b"", "closed the connection without an answer"),
    (b"\n", "closed the connection without an answer"),
    (b"[1, 2]\n", "garbled answer"),
    (b'{"ok": false, "error": "boom"}\n', "refused the status request: boom"),
    (b'{"ok": false}\n', "refused the status request: no reason given"),
    (b'{"pid": 1}\n', "refused the status request"),
    (b"[" * 100000 + b"\n", "garbled answer"),
    (None, "did not answer within 0.5s"),
]


@pytest.mark.parametrize("answer, msg", BAD)
def test_ask_status_turns_every_bad_answer_into_one_line(daemon, answer, msg):
    daemon.answer = answer
    with pytest.raises(P2PFSError, match=msg) as info:
        ask_status(str(daemon.path), timeout=0.5)
    assert "\n" not in str(info.value)


def test_ask_status_without_a_listener(tmp_path):
    with pytest.raises(P2PFSError, match="cannot reach the p2pfs daemon"):
        ask_status(str(tmp_path / "nobody.sock"), timeout=0.5)


def _status(mnt: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pfs", "status", str(mnt), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("answer, msg", BAD)
def test_status_command_is_one_line_on_a_bad_answer(fake_mount, daemon, answer, msg):
    """Regression: these were JSONDecodeError, KeyError or socket.timeout tracebacks."""
    daemon.answer = answer
    r = _status(fake_mount, "--timeout", "0.5")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("p2pfs: error: ") and msg in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_status_table_and_json(fake_mount, daemon):
    daemon.answer = json.dumps(GOOD).encode() + b"\n"
    r = _status(fake_mount)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "{" not in out and "'" not in out  # no Python reprs (regression: hits {'memory': 184})
    lines = out.splitlines()
    for section in ("mount", "cache", "chunks by source", "origin", "errors", "write-back"):
        assert section in lines
    row = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("  ") and ln.split()}
    assert row["memory"][0] == "184" and row["origin"] == ["3", "3.0", "MiB"]
    assert row["eio"] == ["1"] and row["models"] == ["minilm"]
    assert "hit ratio   50.0%" in out
    # The values of one section start in one column.
    cache = lines[lines.index("cache") + 1:lines.index("chunks by source")]
    assert len({len(ln) - len(ln[2:].split("  ", 1)[1].lstrip()) for ln in cache}) == 1
    r = _status(fake_mount, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == GOOD


def test_status_table_of_a_sparse_answer():
    """An older or newer daemon may leave keys out: the table shows '-', never raises."""
    out = format_status({"ok": True, "hits": "odd", "errors": None})
    assert "mountpoint  -" in out and "errors\n  none" in out


def test_status_table_shows_the_peers():
    """Each member with its state and the bytes from and to it; no block without peers,
    and a sparse or odd peers answer never raises."""
    out = format_status({"ok": True, "bytes_by_source": {"origin": 5, "peer": 3 << 20},
                         "peers": {"self": "127.0.0.2:7946", "members": [
                             {"id": "127.0.0.3:7946", "state": "up", "bytes_from": 2 << 20,
                              "bytes_to": 1024, "requests": {"ok": 3, "busy": 1}},
                             {"id": "[fd00::4]:7946", "state": "banned"}, "odd"]}})
    lines = out.splitlines()
    peers = lines[lines.index("peers") + 1:]
    row = {ln.split()[0]: ln.split()[1:] for ln in peers}
    assert row["self"] == ["127.0.0.2:7946"]
    assert row["127.0.0.3:7946"] == ["up", "2.0", "MiB", "1.0", "KiB", "ok", "3,", "busy", "1"]
    assert row["[fd00::4]:7946"] == ["banned", "-", "-", "-"]
    assert ["3.0", "MiB"] == [ln.split() for ln in lines if ln.startswith("  peer ")][0][-2:]
    assert "{" not in out and "'" not in out
    assert "peers" not in format_status({"ok": True}).splitlines()
    odd = format_status({"ok": True, "peers": {"members": "odd"}}).splitlines()
    assert odd[odd.index("peers") + 3].split() == ["members", "none"]
