"""Hostile control-socket clients: garbage, huge lines, idle crowds, descriptors by the
thousand, descriptors of files on the mount itself, hang-ups mid-request, a storm of
status requests. Afterwards the daemon is alive, `p2pfs status` answers within
STATUS_BOUND_S, it holds a bounded number of descriptors, and its memory is within its
settings.

A daemon blocked in the kernel on its own mount (D state, defect 2) ignores SIGKILL, and
so does any process that touches the mount meanwhile: clients that pass a file of the
mount run in a subprocess with a timeout, this process then only uses sockets with
timeouts and /proc, and a wedge is undone by aborting the FUSE connection (fusectl)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import needs_fuse

from .conftest import (FAULT_MEMORY, FIGURES, MiB, assert_served, check_daemon, fd_count,
                       fuse_abort, process_state, rss)

pytestmark = needs_fuse
#: Descriptors the daemon may hold however many clients connect: its own (~40 here) plus
#: a bounded number of connections (256 by default, control.max_connections).
FD_BOUND = 1024
CLIENT_TIMEOUT = 10.0


def control_path(m) -> str:
    return os.getxattr(m.path, "user.p2pfs.control").decode()


def exchange(ctl: str, payload: bytes, *, fds: list[int] = (), timeout: float = CLIENT_TIMEOUT) -> bytes:
    """Send `payload` (then EOF) on a fresh connection; everything the daemon answers
    before it closes. Fails if the daemon neither answers nor closes within `timeout`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        if not _connect_patiently(s, ctl, timeout):
            raise AssertionError(f"could not connect within {timeout}s")
        try:
            if fds:
                socket.send_fds(s, [payload[:65536]], list(fds))
                payload = payload[65536:]
            if payload:
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon cut a request off: fine, if it says why or just closes
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return out
            except socket.timeout:
                raise AssertionError(f"the daemon kept a connection open {timeout}s after "
                                     f"{payload[:60]!r}... without closing it") from None
            if not data:
                return out
            out += data


def status_over_socket(ctl: str, timeout: float = 5.0) -> dict:
    reply = exchange(ctl, b'{"op": "status"}\n', timeout=timeout)
    return json.loads(reply.splitlines()[0])


GARBAGE = [
    b"\x00\xffgarbage\n", b"{\n", b"[1, 2]\n", b"null\n", b'"a string"\n', b"\n\n\n", b"",
    b'{"op": 5}\n', b'{"op": "' + b"x" * 1000 + b'"}\n', b'{"op": "status"',
    b'{"op": "\xff\xfe"}\n', b'{"op": "status", "\\ud800": 1}\n',
    b"[" * 20000 + b"\n", b'{"op": "status", "n": ' + b"9" * 5000 + b"}\n",
    b'{"op": "prefetch", "path": "../../../etc/passwd"}\n',
    b'{"op": "prefetch", "path": "good", "offset": -5, "length": "x"}\n',
    b'{"op": "prefetch", "path": "good", "offset": ' + str(2**70).encode() + b"}\n",
    b'{"op": "prefetch", "path": "good", "length": 1e400}\n',
    b'{"op": "fill", "path": "good/weights.bin"}\n',
    b'{"op": "fill", "path": "good"}\n',
    b'{"op": "metrics", "extra": [[[[[]]]]]}\n',
    b'{"op": "status"}\n' * 1000,
    b"{" * 70000,
    b"x" * (2 * MiB) + b"\n",
]


def test_garbage_lines_never_end_the_daemon(good_store, seaweed, mount_factory):
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    for payload in GARBAGE:
        reply = exchange(ctl, payload)
        FIGURES.ran("control-socket hostile clients")
        assert m.alive(), f"the daemon died of {payload[:60]!r}"
        for line in reply.splitlines():
            msg = json.loads(line)  # whatever it answers is JSON lines
            if msg.get("ok") is False:
                assert "Traceback" not in msg.get("error", "") and len(msg.get("error", "")) < 8192
        FIGURES.survived("control-socket garbage")
    assert status_over_socket(ctl)["ok"] is True
    check_daemon(m, "control socket: garbage")
    assert_served(m.path / "good" / "config.json", good_store["files"]["config.json"])


def test_a_huge_line_is_cut_off_not_buffered(good_store, seaweed, mount_factory):
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    before = rss(m.pid)[0]
    sent = 0
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(CLIENT_TIMEOUT)
        s.connect(ctl)
        block = b"{" * MiB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, socket.timeout):
            while sent < 256 * MiB:
                s.sendall(block)
                sent += len(block)
    FIGURES.ran("control-socket hostile clients")
    assert sent < 256 * MiB, "the daemon read 256 MiB of one request line"
    grown = rss(m.pid)[0] - before
    assert grown < 32 * MiB, f"one unterminated line grew the daemon by {grown / MiB:.0f} MiB"
    FIGURES.survived("control-socket huge line")
    check_daemon(m, "control socket: huge line")


def test_an_idle_crowd_is_bounded(good_store, seaweed, mount_factory):
    """1500 connections that never send a byte: the daemon holds a bounded number of
    them, and once they are gone status answers at once."""
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    crowd: list[socket.socket] = []
    peak = 0
    try:
        connected = 0
        for i in range(1500):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            crowd.append(s)
            connected += _connect_patiently(s, ctl)
            if i % 100 == 99:
                peak = max(peak, fd_count(m.pid))
        assert connected > 1000, f"only {connected} of 1500 connects got through the backlog"
        time.sleep(0.5)
        peak = max(peak, fd_count(m.pid))
        FIGURES.ran("control-socket hostile clients", len(crowd))
        assert m.alive()
    finally:
        for s in crowd:
            s.close()
    deadline = time.monotonic() + 5
    while not _answers(ctl) and time.monotonic() < deadline:
        time.sleep(0.1)
    check_daemon(m, "control socket: idle crowd")
    assert peak <= FD_BOUND, f"the daemon held {peak} descriptors for an idle crowd"
    FIGURES.survived("control-socket idle crowd")


def _connect_patiently(s: socket.socket, ctl: str, timeout: float = 2.0) -> bool:
    """Connect, waiting while the listen backlog is full (a unix socket with a timeout
    says EAGAIN at once then). False if it never got through."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(ctl)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        except OSError:
            return False


def _answers(ctl: str) -> bool:
    try:
        return status_over_socket(ctl, timeout=2).get("ok") is True
    except (OSError, AssertionError, ValueError, IndexError):
        return False


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("fault-fill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_descriptors_by_the_thousand_are_not_kept(good_store, seaweed, mount_factory):
    """A fill session whose every request line carries 4 descriptors (and a status
    request that does): the daemon must not keep them."""
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    base = fd_count(m.pid)
    null = os.open(os.devnull, os.O_RDONLY)
    memfd = _sealed_memfd(len(good_store["files"]["weights.bin"]))
    peak = 0
    replies = 0
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(CLIENT_TIMEOUT)
            s.connect(ctl)
            socket.send_fds(s, [b'{"op": "fill", "path": "good/weights.bin"}\n'], [memfd])

            def drain() -> None:
                nonlocal replies
                with contextlib.suppress(OSError):
                    while data := s.recv(65536):
                        replies += data.count(b"\n")

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for i in range(1000):
                    line = json.dumps({"id": i, "offset": 0, "length": 4096, "at": 0}).encode() + b"\n"
                    socket.send_fds(s, [line], [null] * 4)
                    if i % 100 == 99:
                        peak = max(peak, fd_count(m.pid))
            time.sleep(0.5)
            peak = max(peak, fd_count(m.pid))
            s.shutdown(socket.SHUT_WR)
            reader.join(CLIENT_TIMEOUT)
            assert not reader.is_alive(), "the daemon did not end a fill session after EOF"
        for _ in range(200):
            exchange(ctl, b'{"op": "status"}\n', fds=[null] * 4)
        peak = max(peak, fd_count(m.pid))
    finally:
        os.close(null)
        os.close(memfd)
    FIGURES.ran("control-socket hostile clients", 1200)
    check_daemon(m, "control socket: descriptors")
    assert peak <= max(FD_BOUND, base + 64), f"the daemon held {peak} descriptors (started with {base})"
    FIGURES.survived("control-socket descriptor flood")


PASS_MOUNT_FD = r"""
import json, os, socket, sys, time
ctl, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(5)
    s.connect(ctl)
    socket.send_fds(s, [b'{"op": "status"}\n'], [fd])
    # Keep ours open until the daemon is done with the request: its close(), of a file on
    # its own mount, is then the first to send FLUSH (once a FLUSH was answered ENOSYS the
    # kernel stops sending them, which hid the wedge).
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
time.sleep(0.5)
os.close(fd)
"""


def test_a_descriptor_of_a_file_on_the_mount_does_not_wedge_the_daemon(good_store, seaweed,
                                                                        mount_factory):
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    target = str(m.path / "good" / "config.json")
    wedged = False
    children: list[subprocess.Popen] = []
    try:
        for _ in range(3):
            child = subprocess.Popen([sys.executable, "-c", PASS_MOUNT_FD, ctl, target],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            children.append(child)
            try:
                child.wait(CLIENT_TIMEOUT)
            except subprocess.TimeoutExpired:
                wedged = True  # stuck in its close(): the daemon does not answer FLUSH
            FIGURES.ran("control-socket hostile clients")
            if wedged or not _answers(ctl):
                wedged = True
                break
        state = process_state(m.pid)
        assert not wedged, f"the daemon stopped answering (state {state}) after closing a " \
                           "descriptor of a file on its own mount"
        assert state != "D"
    finally:
        if wedged or process_state(m.pid) == "D":
            fuse_abort(m)  # else nothing, SIGKILL included, gets it out of the kernel
        for child in children:
            child.kill()
            child.wait(30)
    check_daemon(m, "control socket: descriptor of a file on the mount")
    FIGURES.survived("control-socket mount descriptor")


def test_clients_hanging_up_mid_request(good_store, seaweed, mount_factory):
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    size = len(good_store["files"]["weights.bin"])
    for payload, fds in ((b'{"op": "prefetch", "path": "good"}\n', False),
                         (b'{"op": "stat', False),
                         (b'{"op": "status"}\n', False),
                         (b'{"op": "fill", "path": "good/weights.bin"}\n', True),
                         (b'{"op": "fill", "path": "good/weights.bin"}\n{"id": 1, "offset": 0, '
                          b'"length": ' + str(size).encode() + b', "at": 0}\n', True)):
        memfd = _sealed_memfd(size) if fds else None
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(ctl)
                if memfd is not None:
                    socket.send_fds(s, [payload], [memfd])
                else:
                    s.sendall(payload)
                # Hang up at once, unread replies pending: the kernel answers the daemon's
                # next write with EPIPE or ECONNRESET.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            if memfd is not None:
                os.close(memfd)
        time.sleep(0.3)
        FIGURES.ran("control-socket hostile clients")
        assert m.alive(), f"the daemon died when a client hung up after {payload[:50]!r}"
        FIGURES.survived("control-socket hang-up")
    check_daemon(m, "control socket: hang-ups")
    assert_served(m.path / "good" / "weights.bin", good_store["files"]["weights.bin"])


def test_a_storm_of_status_requests(good_store, seaweed, mount_factory):
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    slowest = [0.0]
    failures: list[str] = []

    def one() -> None:
        t0 = time.monotonic()
        try:
            line = json.loads(exchange(ctl, b'{"op": "status"}\n').splitlines()[0])
            if not line.get("ok") and line.get("code") != "busy":
                failures.append(str(line)[:200])
        except (OSError, AssertionError, ValueError, IndexError) as exc:
            failures.append(repr(exc)[:200])
        slowest[0] = max(slowest[0], time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    FIGURES.ran("control-socket hostile clients", len(threads))
    assert not failures, failures[:5]
    assert slowest[0] < CLIENT_TIMEOUT
    check_daemon(m, "control socket: status storm")
    FIGURES.survived("control-socket status storm")


def test_other_users_get_nothing(good_store, seaweed, mount_factory):
    """The socket is the daemon's: a user that is neither root nor in its group gets no
    status (SO_PEERCRED, or the socket's mode)."""
    m = mount_factory(good_store["url"], seaweed.endpoint, "--memory-size", "32MiB")
    ctl = control_path(m)
    code = (
        "import os, socket, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
        "    s.sendall(b'{\"op\": \"status\"}\\n'); print(s.recv(65536).decode())\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n")
    r = subprocess.run([sys.executable, "-c", code, ctl], capture_output=True, text=True, timeout=30)
    FIGURES.ran("control-socket hostile clients")
    assert '"ok": true' not in r.stdout, "user nobody read the daemon's status"
    assert m.alive()
    check_daemon(m, "control socket: other users", memory=FAULT_MEMORY)
