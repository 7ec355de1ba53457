"""The control protocol without I/O: framing, requests, replies, limits, who may connect.

Requests are JSON objects, one per line (at most `MAX_REQUEST` bytes); replies are JSON
lines. A refused request gets `{"ok": false, "error": "<one line>", "code": "<code>"}`
with one of the codes below, so a program can tell a mistake of its own from a busy or
failing daemon. File descriptors (SCM_RIGHTS) are taken only with a connection's first
line, and only by an op that expects them (`OP_FDS`). docs/FORMAT.md ("Control socket")
is the reference; this module is its executable form, tested on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import ManifestError, ProtocolError
from ..manifest import check_path

MAX_REQUEST = 64 * 1024   # bytes of one request line
MAX_FDS_PER_MESSAGE = 1   # descriptors the daemon takes with one message (the most any op takes)

#: Error codes of refused requests.
BAD_REQUEST = "bad_request"              # malformed, unknown op, wrong fds, bad arguments
PERMISSION_DENIED = "permission_denied"  # SO_PEERCRED: not root, the daemon's uid or group
BUSY = "busy"                            # the daemon serves max_connections already
TIMEOUT = "timeout"                      # the client sent nothing (or read nothing) in time
FAILED = "failed"                        # the op was valid but failed (store, cache, ...)
NOT_LOCAL = "not_local"                  # open: the file is not whole on local disk (yet)
INTERNAL = "internal"                    # a bug of ours (logged with a traceback)

#: The file descriptors each op takes with its first line.
OP_FDS = {"status": 0, "metrics": 0, "prefetch": 0, "fill": 1, "refresh": 0, "open": 0}
#: Most paths one refresh request may name.
MAX_REFRESH_PATHS = 1024


@dataclass(frozen=True, kw_only=True)
class ControlLimits:
    """Bounds that keep one client (or many) from exhausting the daemon."""

    #: Connections served at once; more get a BUSY line and are closed.
    max_connections: int = 256
    #: Seconds a connection has to send its request line.
    idle_timeout: float = 30.0
    #: Seconds a fill session may go without a request while none is in flight.
    fill_idle_timeout: float = 120.0
    #: Seconds the daemon waits for a client to take one reply line before it gives up on it.
    send_timeout: float = 30.0
    #: Fill requests of one session served at once (more wait unread: backpressure).
    fill_inflight: int = 64

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.fill_inflight < 1:
            raise ValueError("max_connections and fill_inflight must be at least 1")
        if min(self.idle_timeout, self.fill_idle_timeout, self.send_timeout) <= 0:
            raise ValueError("timeouts must be positive")


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def error(message: str, code: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code, **extra}


class LineBuffer:
    """Request lines out of received bytes. A line longer than `max_line` is a
    ProtocolError; at EOF a last line without its newline still counts."""

    def __init__(self, max_line: int = MAX_REQUEST) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Add received bytes; b"" means the peer finished sending."""
        if not data:
            self.eof = True
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line (without its newline), or None if more bytes are needed
        (or, at EOF, if nothing is left)."""
        i = self._buf.find(b"\n", 0, self.max_line + 1)
        if i < 0:
            if len(self._buf) > self.max_line:
                raise ProtocolError(f"request line longer than {self.max_line} bytes")
            if not self.eof or not self._buf:
                return None
            i = len(self._buf)
        line = bytes(self._buf[:i])
        del self._buf[:i + 1]
        return line


def parse_request(line: bytes) -> dict[str, Any]:
    """A request object from one line."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ProtocolError("request must be a JSON object")
    return req


def op_of(req: dict[str, Any]) -> str:
    op = req.get("op")
    if not isinstance(op, str) or op not in OP_FDS:
        raise ProtocolError(f"unknown op {op!r} (known: {', '.join(OP_FDS)})")
    return op


def check_fds(op: str, received: int, dropped: bool) -> None:
    """Whether the descriptors that came with `op`'s first line are what it takes;
    `dropped`: the kernel discarded more than we made room for."""
    want = OP_FDS[op]
    if received == want and not dropped:
        return
    got = f"{received}{' or more' if dropped else ''}"
    if want == 0:
        raise ProtocolError(f"op {op!r} takes no file descriptors (got {got})")
    raise ProtocolError(f"op {op!r} takes exactly {want} file descriptor(s) with its first "
                        f"line (SCM_RIGHTS), got {got}")


def late_fds_error() -> ProtocolError:
    return ProtocolError("file descriptors are taken only with a connection's first line")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise ProtocolError(f"{what} must not be negative, got {value}")
    return value


def path_of(req: dict[str, Any]) -> str:
    """A request's path, relative to the mount root ("" for the root)."""
    path = req.get("path", "")
    if not isinstance(path, str):
        raise ProtocolError(f"path must be a string, got {path!r}")
    return path.strip("/")


class PrefetchRequest(NamedTuple):
    path: str
    offset: int
    length: int | None   # None: to the end of each file


def parse_prefetch(req: dict[str, Any]) -> PrefetchRequest:
    offset = _int(req.get("offset") or 0, "offset")
    length = req.get("length")
    return PrefetchRequest(path_of(req), offset,
                           None if length is None else _int(length, "length"))


def parse_refresh(req: dict[str, Any]) -> tuple[str, ...] | None:
    """The mount-relative directories a refresh names (each where one model's manifest
    may now be), or None: look at the whole prefix again."""
    paths = req.get("paths")
    if paths is None:
        return None
    if not isinstance(paths, list) or len(paths) > MAX_REFRESH_PATHS:
        raise ProtocolError(f"paths must be a list of at most {MAX_REFRESH_PATHS} strings")
    out = []
    for p in paths:
        if not isinstance(p, str):
            raise ProtocolError(f"each path must be a string, got {p!r}")
        p = p.strip("/")
        try:
            check_path(p)
        except ManifestError as exc:
            raise ProtocolError(str(exc)) from None
        if not p:
            raise ProtocolError("refresh paths name directories under the mount, not its root")
        out.append(p)
    return tuple(out)


class FillRequest(NamedTuple):
    id: Any
    offset: int   # file bytes [offset, offset + length) ...
    length: int
    at: int       # ... go to memory bytes [at, at + length)


def parse_fill(r: dict[str, Any], file_size: int, memory_size: int) -> FillRequest:
    try:
        rid, offset, length, at = r["id"], r["offset"], r["length"], r["at"]
    except KeyError as exc:
        raise ProtocolError(f"fill request needs id, offset, length, at (no {exc})") from None
    offset, length, at = _int(offset, "offset"), _int(length, "length"), _int(at, "at")
    if offset + length > file_size or at + length > memory_size:
        raise ProtocolError(f"fill request out of bounds: bytes {offset}+{length} of a "
                            f"{file_size}-byte file at {at} of {memory_size} bytes of memory")
    return FillRequest(rid, offset, length, at)


class Peer(NamedTuple):
    """A client's credentials as the kernel recorded them at connect (SO_PEERCRED,
    SO_PEERGROUPS)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def may_connect(peer: Peer, *, daemon_uid: int, group: int | None) -> bool:
    """Root, the daemon's own user, or a member of the configured group."""
    if peer.uid in (0, daemon_uid):
        return True
    return group is not None and (peer.gid == group or group in peer.groups)


def may_read(peer: Peer, *, uid: int, gid: int, mode: int) -> bool:
    """Whether the mount would let `peer` read a file of this owner and mode (the kernel's
    owner / group / other rule; root reads everything). The `open` op hands out the bytes
    themselves, so it checks what FUSE would have."""
    if peer.uid == 0:
        return True
    if peer.uid == uid:
        return bool(mode & 0o400)
    if peer.gid == gid or gid in peer.groups:
        return bool(mode & 0o040)
    return bool(mode & 0o004)


def denied(peer: Peer, group_name: str | None) -> dict[str, Any]:
    who = f"uid {peer.uid} (pid {peer.pid})"
    allowed = "root, the daemon's user" + (f" or group {group_name}" if group_name else "")
    return error(f"permission denied: {who} is not {allowed}", PERMISSION_DENIED)
