"""Asking a peer for a chunk: one GET per chunk over keep-alive connections, the body
received straight into the caller's buffer.

Like the origin's range client (p2pfs/origin/_http.py, whose head parser and kernel
timeouts this reuses), each request runs in a worker thread on a blocking socket: the body
arrives with `recv_into(..., MSG_WAITALL)` in a few system calls with the GIL released.
SO_RCVTIMEO/SO_SNDTIMEO are set on every call to the smaller of `timeout` (the longest
wait for progress: a byte of the answer, or an owner's `102 Processing` sent while it
fetches the chunk itself) and the time left before the request's deadline (`total`), so a
peer that stops answering (SIGSTOPped, a dead link) ends the request within `timeout`,
while a live owner behind a slow origin keeps its requesters waiting instead of sending
them to the next rank (a fallback storm); the trio task waits for its thread, so no
thread ever writes into `dest` after `fetch_into` returned or raised.

Every failure is a PeerError with `.peer` set (see `_wire.error_for` for statuses):
PeerUnavailable for connect refused / timed out / reset / no answer in time;
PeerProtocolError for an answer that breaks the protocol (garbage, a wrong length), which
bans the peer; a body cut short (the peer died mid-answer) is PeerUnavailable. A reused keep-alive connection the peer closed while idle
is retried once on a fresh one (GETs are idempotent).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable

import trio

from ..errors import OriginUnavailable, PeerError, PeerProtocolError, PeerUnavailable
from ..origin._http import _set_timeouts, parse_head
from ._members import parse_addr
from ._wire import SOURCE_HEADER, SOURCES, Locator, auth_headers, error_for, request_target

MAX_HEAD = 16 * 1024
#: An error answer's body is read (to keep the connection) only up to this size.
MAX_ERROR_BODY = 16 * 1024
_WILDCARDS = ("0.0.0.0", "::", "")


class _Stale(Exception):
    """The connection closed before any byte of an answer: an idle one the peer dropped."""


class _Conn:
    __slots__ = ("sock", "idle_since")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle_since = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Abort:
    """Ends one request early from another thread or task: `abort()` shuts its socket, so
    the receive returns at once and the request raises. A hedge that won uses it, so that
    it can write into the destination alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _attach(self, sock: socket.socket | None) -> bool:
        """Watch `sock` (None: stop watching); False if already aborted."""
        with self._lock:
            self._sock = sock
            return not (self.aborted and sock is not None)


class PeerClient:
    """Fetches chunks from peers as node `node_id`, signing with `token`.

    Connections come from the node's own host (its id's address), so peers on one machine's
    loopback aliases see each other as distinct clients. At most `max_idle_per_peer` idle
    connections are kept per peer, each for at most `max_idle_age` seconds (shorter than a
    server's keep-alive timeout, so a reused one has rarely been dropped)."""

    def __init__(self, *, node_id: str, token: bytes, connect_timeout: float = 0.25,
                 max_idle_per_peer: int = 4, max_idle_age: float = 20.0,
                 max_threads: int = 32, clock: Callable[[], float] = time.time) -> None:
        host, _ = parse_addr(node_id)
        self.node_id = node_id
        self._token = token
        self._source = None if host in _WILDCARDS else host
        self.connect_timeout = connect_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self.max_idle_age = max_idle_age
        self._clock = clock
        self._idle: dict[str, list[_Conn]] = {}
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(max_threads)
        self.connects = 0  # connections opened, ever (keep-alive reuse shows here)

    async def fetch_into(self, peer: str, loc: Locator, dest: memoryview, *, timeout: float,
                         cached_only: bool = False, abort: Abort | None = None,
                         total: float | None = None) -> str:
        """Receive chunk `loc` from `peer` into dest[:loc.size]; returns where the peer had
        it from (memory, disk, peer, origin). The digest is the caller's to check.
        `abort`: lets the caller end the request early (it then raises a PeerError).
        `timeout`: the longest wait for progress (a byte of the answer, or the owner's
        `102 Processing` while it fetches the chunk itself); `total`: the longest the whole
        request may take (default `timeout`)."""
        view = memoryview(dest).cast("B")
        if len(view) < loc.size or view.readonly:
            raise ValueError(f"dest must be a writable buffer of at least {loc.size} bytes")
        return await trio.to_thread.run_sync(self._fetch_sync, peer, loc, view[:loc.size],
                                             timeout, cached_only, abort, total,
                                             limiter=self._limiter)

    def _fetch_sync(self, peer: str, loc: Locator, view: memoryview, timeout: float,
                    cached_only: bool, abort: Abort | None = None,
                    total: float | None = None) -> str:
        deadline = time.monotonic() + max(timeout, total or 0.0)
        target = request_target(loc, cached_only=cached_only)
        lines = [f"GET {target} HTTP/1.1", f"Host: {peer}", "User-Agent: p2pfs",
                 *(f"{k}: {v}" for k, v in auth_headers(
                     self._token, method="GET", target=target, locator=loc,
                     node=self.node_id, ts=int(self._clock())))]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        for attempt in (0, 1):
            conn = self._take(peer)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._connect(peer, deadline)
                if abort is not None and not abort._attach(conn.sock):
                    conn.close()
                    raise PeerUnavailable(f"peer {peer}: request aborted", peer=peer)
                _set_timeouts(conn.sock, max(0.001, min(timeout, deadline - time.monotonic())))
                try:
                    outcome, keep = self._exchange(conn, request, view, peer, deadline, timeout)
                finally:
                    if abort is not None:
                        abort._attach(None)
                        keep_ok = not abort.aborted
                if abort is not None and not keep_ok:
                    keep = False
            except _Stale:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise PeerUnavailable(f"peer {peer}: closed the connection before answering",
                                      peer=peer) from None
            except (socket.timeout, BlockingIOError, TimeoutError):
                if conn is not None:
                    conn.close()
                raise PeerUnavailable(f"peer {peer}: no complete answer within {timeout:g}s",
                                      peer=peer) from None
            except OSError as exc:
                if conn is not None:
                    conn.close()
                raise PeerUnavailable(f"peer {peer}: {type(exc).__name__}: {exc}",
                                      peer=peer) from None
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._put(peer, conn) if keep else conn.close()
            if isinstance(outcome, PeerError):
                raise outcome
            return outcome
        raise AssertionError("unreachable")

    def _connect(self, peer: str, deadline: float) -> _Conn:
        host, port = parse_addr(peer)
        source = self._source if self._source and (":" in self._source) == (":" in host) else None
        limit = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((host, port), timeout=limit,
                                            source_address=(source, 0) if source else None)
        except OSError as exc:
            raise PeerUnavailable(f"peer {peer}: cannot connect ({exc})", peer=peer) from None
        self.connects += 1
        sock.settimeout(None)  # blocking; the kernel timeouts bound each call
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)

    def _exchange(self, conn: _Conn, request: bytes, view: memoryview, peer: str,
                  deadline: float, stall: float) -> tuple[str | PeerError, bool]:
        """(source or the PeerError the answer means, whether the connection is reusable).
        Each receive waits at most `stall` seconds, the whole exchange until `deadline`;
        `1xx` heads (the owner's 102 Processing while it fetches) are progress, skipped."""
        sock = conn.sock
        head, answered = b"", False
        try:
            sock.sendall(request)
            while True:
                while (end := head.find(b"\r\n\r\n")) < 0:
                    if len(head) > MAX_HEAD:
                        raise PeerProtocolError(f"peer {peer}: answer head over {MAX_HEAD} bytes",
                                                peer=peer)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    _set_timeouts(sock, max(0.001, min(stall, left)))
                    data = sock.recv(65536)
                    if not data:
                        if head or answered:
                            raise PeerProtocolError(f"peer {peer}: closed mid-head", peer=peer)
                        raise _Stale
                    head += data
                try:
                    resp = parse_head(head[:end])
                except OriginUnavailable as exc:
                    raise PeerProtocolError(f"peer {peer}: {exc}", peer=peer) from None
                head, answered = head[end + 4:], True
                if not 100 <= resp.status < 200:
                    break
        except (BrokenPipeError, ConnectionResetError):
            if head or answered:
                raise
            raise _Stale from None
        rest = head
        clen = resp.content_length
        if "transfer-encoding" in resp.headers or clen is None:
            raise PeerProtocolError(f"peer {peer}: answer without a Content-Length", peer=peer)
        if resp.status != 200:
            keep = resp.keep_alive and clen <= MAX_ERROR_BODY
            while keep and len(rest) < clen:
                data = sock.recv(clen - len(rest))
                if not data:
                    keep = False
                rest += data
            return error_for(resp.status, resp.headers, peer=peer), keep and len(rest) == clen
        size = len(view)
        if clen != size:
            raise PeerProtocolError(f"peer {peer}: sends {clen} bytes for a {size}-byte chunk",
                                    peer=peer)
        source = resp.headers.get(SOURCE_HEADER, "")
        if source not in SOURCES:
            raise PeerProtocolError(f"peer {peer}: unknown source {source[:20]!r}", peer=peer)
        if len(rest) > size:
            raise PeerProtocolError(f"peer {peer}: bytes past the body", peer=peer)
        n = len(rest)
        view[:n] = rest
        while n < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            # Each receive waits for progress at most `stall`; a trickle still ends at the deadline.
            _set_timeouts(sock, max(0.001, min(stall, left)))
            k = sock.recv_into(view[n:], size - n, socket.MSG_WAITALL)
            if not k:  # it died or closed mid-answer: health, not a ban (nothing wrong was sent)
                raise PeerUnavailable(f"peer {peer}: body cut short at {n} of {size} bytes",
                                      peer=peer)
            n += k
        return source, resp.keep_alive

    def _take(self, peer: str) -> _Conn | None:
        stale: list[_Conn] = []
        conn = None
        with self._lock:
            idle = self._idle.get(peer, [])
            too_old = time.monotonic() - self.max_idle_age
            while idle:
                c = idle.pop()
                if c.idle_since >= too_old:
                    conn = c
                    break
                stale.append(c)
        for c in stale:
            c.close()
        return conn

    def _put(self, peer: str, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(peer, [])
            if len(idle) < self.max_idle_per_peer:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection (requests in flight close theirs when done)."""
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()
