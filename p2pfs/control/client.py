"""The blocking client of the control socket: plain sockets, no trio, so gpuload's
threads, the CLI and any other program can use it. (`p2pfs.fill.FillClient` is the client
of a fill session.)"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, P2PFSError, ProtocolError

CONTROL_XATTR = "user.p2pfs.control"
MAX_REPLY = 16 << 20  # bytes of one reply line (status of a mount with many models)


def find_mount(path: str | os.PathLike[str]) -> Path | None:
    """The p2pfs mount that holds `path`, or None."""
    p = Path(os.path.realpath(path))
    for cand in (p, *p.parents):
        if os.path.ismount(cand):
            try:
                os.getxattr(cand, CONTROL_XATTR)
                return cand
            except OSError:
                return None
    return None


def mount_relative(path: str | os.PathLike[str], mountpoint: Path) -> str:
    """`path` as the control protocol names it: relative to the mount root, "" for the root."""
    rel = os.path.relpath(os.path.realpath(path), mountpoint)
    return "" if rel == "." else rel


def control_socket(mountpoint: str | os.PathLike[str]) -> str:
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not a running p2pfs mount ({exc.strerror})") from None


def connect(path: str, *, timeout: float | None) -> socket.socket:
    """A connection to the control socket at `path` (ConfigError if nobody listens)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot reach the p2pfs daemon at {path}: "
                          f"{exc.strerror or exc}") from None
    return s


def request(mountpoint: str | os.PathLike[str], req: dict[str, Any], *,
            timeout: float | None = 30.0) -> Iterator[dict[str, Any]]:
    """Send one request to the daemon serving `mountpoint`; yield its reply lines.
    ConfigError if there is no daemon; P2PFSError if it goes silent for `timeout`
    seconds or the connection fails; ProtocolError for a reply that is not a JSON object."""
    path = control_socket(mountpoint)
    with connect(path, timeout=timeout) as s:
        buf = b""
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            while True:
                while b"\n" not in buf:
                    if len(buf) > MAX_REPLY:
                        raise ProtocolError(f"the p2pfs daemon at {path} sent a reply line "
                                            f"longer than {MAX_REPLY} bytes")
                    data = s.recv(1 << 16)
                    if not data:
                        if buf.strip():
                            yield _reply(buf, path)
                        return
                    buf += data
                line, _, buf = buf.partition(b"\n")
                yield _reply(line, path)
        except TimeoutError:
            raise P2PFSError(f"the p2pfs daemon at {path} sent nothing for {timeout:g} s") from None
        except OSError as exc:
            raise P2PFSError(f"connection to the p2pfs daemon at {path} failed: "
                             f"{exc.strerror or exc}") from None


def _reply(line: bytes, path: str) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        msg = None
    if not isinstance(msg, dict):
        raise ProtocolError(f"the p2pfs daemon at {path} sent a garbled reply: {line[:80]!r}")
    return msg


def prefetch(path: str | os.PathLike[str], *, offset: int = 0, length: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
    """Ask the daemon to make a file or directory under a p2pfs mount local; block until
    it is. Raises ConfigError if `path` is not on a p2pfs mount, P2PFSError on failure."""
    mnt = find_mount(path)
    if mnt is None:
        raise ConfigError(f"{path} is not on a p2pfs mount")
    rel = mount_relative(path, mnt)
    last: dict[str, Any] = {}
    for msg in request(mnt, {"op": "prefetch", "path": rel, "offset": offset, "length": length},
                       timeout=timeout):
        last = msg
        if progress and "done" in msg:
            progress(msg["done"], msg["total"])
    if not last.get("ok"):
        raise P2PFSError(f"prefetch of {path} failed: {last.get('error', 'no answer')}")
    return last


def refresh(mountpoint: str | os.PathLike[str], paths: list[str] | None = None, *,
            timeout: float | None = 60.0) -> dict[str, Any]:
    """Ask the daemon serving `mountpoint` to attach models (image layers) published
    since it mounted: those at `paths` (mount-relative directories), or every new one
    under its prefix. Returns {"added": [...], "problems": [...], ...}; raises P2PFSError
    if the daemon refuses or fails."""
    req: dict[str, Any] = {"op": "refresh"}
    if paths is not None:
        req["paths"] = list(paths)
    last: dict[str, Any] = {}
    for msg in request(mountpoint, req, timeout=timeout):
        last = msg
    if not last.get("ok"):
        raise P2PFSError(f"refresh of {mountpoint} failed: {last.get('error', 'no answer')}")
    return last


def open_local(path: str | os.PathLike[str], *, timeout: float | None = 60.0,
               mountpoint: str | os.PathLike[str] | None = None) -> int | None:
    """A read-only descriptor of the local copy of a file on a p2pfs mount, if the daemon
    holds it whole and checked on local disk (the caller owns it: map it, read it, close
    it); None if it is not local yet (read through the mount, or `fill`). Raises
    ConfigError if `path` is not on a p2pfs mount, P2PFSError if the daemon refuses
    (e.g. permission_denied) or fails. The first open of a file just written may wait
    while the daemon reads back and checks what it has not checked yet. `mountpoint`: the
    mount holding `path`, if the caller knows it already."""
    mnt = find_mount(path) if mountpoint is None else Path(mountpoint)
    if mnt is None:
        raise ConfigError(f"{path} is not on a p2pfs mount")
    sock_path = control_socket(mnt)
    req = {"op": "open", "path": mount_relative(path, mnt)}
    with connect(sock_path, timeout=timeout) as s:
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            data, fds = _recv_line_with_fds(s, sock_path)
        except TimeoutError:
            raise P2PFSError(f"the p2pfs daemon at {sock_path} sent nothing for {timeout:g} s") from None
        except OSError as exc:
            raise P2PFSError(f"connection to the p2pfs daemon at {sock_path} failed: "
                             f"{exc.strerror or exc}") from None
    try:
        msg = _reply(data, sock_path)
        if msg.get("ok") and len(fds) == 1:
            fd = fds.pop()
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == msg.get("size"):
                return fd
            os.close(fd)
            raise ProtocolError(f"the p2pfs daemon at {sock_path} sent a descriptor that is not "
                                f"the file's local copy")
        if msg.get("code") == "not_local":
            return None
        raise P2PFSError(f"open of {path} failed: {msg.get('error', 'no answer')}")
    finally:
        for fd in fds:
            os.close(fd)


def _recv_line_with_fds(s: socket.socket, where: str) -> tuple[bytes, list[int]]:
    """One reply line and the descriptors that came with it."""
    buf, fds = b"", []
    space = socket.CMSG_SPACE(4 * 4)
    while b"\n" not in buf:
        if len(buf) > MAX_REPLY:
            raise ProtocolError(f"the p2pfs daemon at {where} sent a reply line longer than "
                                f"{MAX_REPLY} bytes")
        data, anc, _, _ = s.recvmsg(1 << 16, space)
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) // 4 * 4]))
        if not data:
            break
        buf += data
    return buf.partition(b"\n")[0], fds
