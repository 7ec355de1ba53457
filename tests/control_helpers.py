"""Helpers for the control-socket tests: raw clients that cannot hang the test process,
and a way out if a daemon wedges anyway (abort its FUSE connection through fusectl).

A daemon blocked in the kernel on its own mount (D state) ignores SIGKILL, and so does
any process that touches the mount meanwhile. So: every client that holds or passes a
file on the mount runs in a subprocess with a timeout; the test process itself only uses
sockets with timeouts and /proc; and `wedge_guard` aborts the FUSE connection if anything
timed out, which fails every request the kernel holds and frees every waiter.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from p2pfs.tune import FUSECTL, mount_entry


def control_path(mountpoint: Path) -> str:
    return os.getxattr(mountpoint, "user.p2pfs.control").decode()


def ask(ctl: str, req: dict | bytes, *, fds: list[int] = (), timeout: float = 5.0) -> dict:
    """One request on a fresh connection; the first reply line (or AssertionError)."""
    line = req if isinstance(req, bytes) else json.dumps(req).encode() + b"\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(ctl)
        if fds:
            socket.send_fds(s, [line], list(fds))
        else:
            s.sendall(line)
        return read_reply(s)


def read_reply(s: socket.socket) -> dict:
    buf = b""
    while b"\n" not in buf:
        try:
            data = s.recv(65536)
        except socket.timeout:
            raise AssertionError(f"no reply line within {s.gettimeout()} s") from None
        if not data:
            raise AssertionError(f"connection closed without a reply line (got {buf!r})")
        buf += data
    return json.loads(buf.partition(b"\n")[0])


def answers_status(ctl: str, timeout: float = 5.0) -> bool:
    try:
        return ask(ctl, {"op": "status"}, timeout=timeout).get("ok") is True
    except (OSError, AssertionError, ValueError):
        return False


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fuse_connection(mountpoint: Path) -> Path | None:
    """The fusectl directory of the mount (mounting fusectl if needed), found without
    touching the mount itself."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return None
    if FUSECTL.is_dir() and not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False,
                       capture_output=True, timeout=10)
    conn = FUSECTL / str(os.makedev(entry[0], entry[1]))
    return conn if conn.is_dir() else None


@contextlib.contextmanager
def wedge_guard(mountpoint: Path) -> Iterator[list[subprocess.Popen]]:
    """Yields a list to put client subprocesses in. On the way out, whatever happened: if
    a client is still running or the daemon stopped answering, abort the FUSE connection
    (the only way to free a task blocked on it), then kill the clients."""
    conn = fuse_connection(mountpoint)
    assert conn is not None, "no fusectl entry for the mount: cannot guard against a wedge"
    ctl = control_path(mountpoint)
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        if any(p.poll() is None for p in procs) or not answers_status(ctl, timeout=3):
            with contextlib.suppress(OSError):
                (conn / "abort").write_text("1")
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


# A client that opens FILE (on the mount), passes that fd with one request line, prints
# the reply line, hangs up and keeps its own copy open for a while, so that the daemon's copy is
# closed first: the close that used to send FLUSH to the daemon's own (busy) thread.
FD_CLIENT = r"""
import json, os, socket, sys, time
ctl, file, line = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(file, os.O_RDONLY)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(ctl)
socket.send_fds(s, [line.encode() + b"\n"], [fd])
buf = b""
while b"\n" not in buf:
    data = s.recv(65536)
    if not data:
        break
    buf += data
print(buf.partition(b"\n")[0].decode(), flush=True)
s.close()
time.sleep(1.0)
"""


def fd_client(procs: list[subprocess.Popen], ctl: str, file: Path, line: str) -> subprocess.Popen:
    """Start FD_CLIENT sending `line` (a request line, without its newline)."""
    p = subprocess.Popen([sys.executable, "-c", FD_CLIENT, ctl, str(file), line],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def reply_of(p: subprocess.Popen, timeout: float = 15.0) -> dict:
    """The reply line the client printed; AssertionError if it did not finish in time
    (the guard then aborts the connection)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("fd client did not finish: is the daemon wedged?") from None
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


# A well-behaved fill session (a sealed memfd with its first line) that then passes FILE
# (on the mount) with a later request line, prints every reply line until the daemon
# closes or 5 s pass, and keeps its copy of FILE open a while.
FD_SESSION_CLIENT = r"""
import fcntl, json, os, socket, sys, time
ctl, file, path = sys.argv[1], sys.argv[2], sys.argv[3]
mem = os.memfd_create("m", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(mem, 1 << 20)
fcntl.fcntl(mem, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(ctl)
socket.send_fds(s, [json.dumps({"op": "fill", "path": path}).encode() + b"\n"], [mem])
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
fd = os.open(file, os.O_RDONLY)
req = json.dumps({"id": 1, "offset": 0, "length": 4, "at": 0}).encode() + b"\n"
socket.send_fds(s, [req], [fd])
try:
    for line in f:
        print(line.decode().strip(), flush=True)
except (OSError, ValueError):
    pass
f.close()
s.close()
time.sleep(1.0)
"""


def fd_session_client(procs: list[subprocess.Popen], ctl: str, file: Path,
                      path: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", FD_SESSION_CLIENT, ctl, str(file), path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def replies_of(p: subprocess.Popen, timeout: float = 15.0) -> list[dict]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("fd client did not finish: is the daemon wedged?") from None
    assert p.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]
