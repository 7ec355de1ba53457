"""A lean HTTP/1.1 client for the one request on the hot path: a ranged GET of a
presigned object URL, read straight into one preallocated buffer.

Why not aiobotocore's get_object for this: profiling a cold sequential read showed the
daemon's trio thread ~95% busy, half of it in asyncio/aiohttp callbacks that move the body
in 64 KiB pieces and join them. Reading with `recv_into` into the final buffer costs a
handful of Python calls per MiB; on this machine it doubled ranged-GET throughput against
the same SeaweedFS (bench/RESULTS.md). Everything else (signing through the standard
credential chain, list, head, put, multipart) stays on aiobotocore; `S3Config.fast_get =
false` sends GETs through aiobotocore too (e.g. behind an HTTP proxy, which this client
does not speak).

The response-head parser is pure; the connection pool bounds idle connections and drops
any connection that saw an error or an unread body. Requests run in worker threads on
blocking sockets (see RangeClient).
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from .._buffers import aligned_empty
from ..errors import ObjectNotFound, ObjectTruncated, OriginAccessDenied, OriginError, OriginUnavailable

MAX_HEAD = 64 * 1024
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ","

    @property
    def content_length(self) -> int | None:
        v = self.headers.get("content-length")
        return int(v) if v is not None and v.isdigit() else None

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("connection", "").lower()


def parse_head(raw: bytes) -> ResponseHead:
    """Parse a status line and headers (without the final blank line)."""
    try:
        text = raw.decode("latin-1")
        status_line, *lines = text.split("\r\n")
        version, code, *reason = status_line.split(" ", 2)
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(status_line)
        headers: dict[str, str] = {}
        for line in lines:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line)
            name = name.strip().lower()
            headers[name] = f"{headers[name]},{value.strip()}" if name in headers else value.strip()
        return ResponseHead(int(code), reason[0] if reason else "", headers)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OriginUnavailable(f"malformed HTTP response head: {exc}") from None


_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


def error_for(status: int, body: bytes, what: str) -> OriginError:
    m = _CODE.search(body)
    code = m.group(1).decode("ascii", "replace") if m else ""
    msg = f"{what}: HTTP {status} {code}".rstrip()
    if status == 404:
        return ObjectNotFound(msg)
    if status == 403:
        return OriginAccessDenied(msg + " (check AWS credentials)")
    if status == 416:
        return ObjectTruncated(msg + " (range starts past the object's end: it changed since "
                               "it was indexed; re-run `p2pfs index`)")
    if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout"):
        return OriginUnavailable(msg)
    return OriginError(msg)


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel timeouts for each send and receive call (a zero timeval would mean none)."""
    usec = max(1, round(seconds * 1e6))
    tv = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _Conn:
    __slots__ = ("sock", "buffered")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffered = b""  # bytes received past the previous response (none, normally)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RangeClient:
    """GETs of presigned URLs with a Range header, over a pool of keep-alive connections.

    Each request runs in a worker thread on a blocking socket: the body arrives with
    `recv_into(..., MSG_WAITALL)` straight into its final buffer in one or a few system
    calls, with the GIL released, instead of one event-loop round trip per socket read on
    the trio thread (which also serves FUSE). SO_RCVTIMEO/SO_SNDTIMEO bound every call, so
    a thread can never hang on a dead server. The pool is guarded by a lock."""

    def __init__(self, *, connect_timeout: float, request_timeout: float, max_idle: int = 32,
                 max_threads: int = 32) -> None:
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context()
        self._limiter = trio.CapacityLimiter(max_threads)

    async def get_range(self, url: str, offset: int, length: int, *, what: str,
                        timeout: float | None = None) -> memoryview:
        return await trio.to_thread.run_sync(self._get_sync, url, offset, length, what, None,
                                             timeout, limiter=self._limiter)

    async def get_range_into(self, url: str, offset: int, dest: memoryview, *, what: str,
                             timeout: float | None = None) -> None:
        """Receive bytes [offset, offset + len(dest)) straight into `dest`. The thread is
        never abandoned (it writes into `dest`); `timeout` bounds it instead."""
        await trio.to_thread.run_sync(self._get_sync, url, offset, len(dest), what, dest,
                                      timeout, limiter=self._limiter)

    def _get_sync(self, url: str, offset: int, length: int, what: str,
                  into: memoryview | None, timeout: float | None = None) -> memoryview:
        u = urlsplit(url)
        scheme = u.scheme
        port = u.port or (443 if scheme == "https" else 80)
        pool_key = (scheme, u.hostname or "", port)
        target = u.path + ("?" + u.query if u.query else "")
        request = (f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                   f"Range: bytes={offset}-{offset + length - 1}\r\n"
                   "Accept-Encoding: identity\r\nUser-Agent: p2pfs\r\n\r\n").encode()
        limit = self.request_timeout if timeout is None else max(0.001, min(timeout, self.request_timeout))
        deadline = time.monotonic() + limit
        for attempt in (0, 1):
            with self._lock:
                idle = self._idle.get(pool_key)
                conn = idle.pop() if idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect(scheme, pool_key[1], port)
            try:
                # Every blocking call on this socket ends by the deadline (the kernel
                # timeouts are per call; the remaining time is what each may take).
                _set_timeouts(conn.sock, max(0.001, deadline - time.monotonic()))
                data, keep = self._exchange(conn, request, length, what, deadline, into)
            except _StaleConnection:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: retry once
                raise OriginUnavailable(f"{what}: connection closed before a response") from None
            except (socket.timeout, BlockingIOError, TimeoutError):
                conn.close()
                raise OriginUnavailable(f"{what}: no complete response within {limit:g}s") from None
            except OSError as exc:
                conn.close()
                raise OriginUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
            except BaseException:
                conn.close()
                raise
            if keep:
                with self._lock:
                    idle = self._idle.setdefault(pool_key, [])
                    if len(idle) < self.max_idle:
                        idle.append(conn)
                        conn = None
            if conn is not None:
                conn.close()
            return data
        raise AssertionError("unreachable")

    def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as exc:
            raise OriginUnavailable(f"{scheme}://{host}:{port}: cannot connect ({exc})") from None
        sock.settimeout(None)  # blocking; the kernel-level timeouts (_set_timeouts) bound each call
        _set_timeouts(sock, self.request_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise OriginUnavailable(f"https://{host}:{port}: TLS failed ({exc})") from None
        return _Conn(sock)

    def _exchange(self, conn: _Conn, request: bytes, length: int, what: str,
                  deadline: float, into: memoryview | None) -> tuple[memoryview, bool]:
        sock = conn.sock
        sock.sendall(request)
        head = conn.buffered
        conn.buffered = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > MAX_HEAD:
                raise OriginUnavailable(f"{what}: response head over {MAX_HEAD} bytes")
            data = sock.recv(65536)
            if not data:
                raise _StaleConnection
            head += data
        resp = parse_head(head[:end])
        rest = head[end + 4:]
        clen = resp.content_length
        if resp.status not in (200, 206):
            body = rest
            while clen is not None and len(body) < min(clen, MAX_ERROR_BODY):
                data = sock.recv(65536)
                if not data:
                    break
                body += data
            raise error_for(resp.status, body, what)
        if "chunked" in resp.headers.get("transfer-encoding", "").lower() or clen is None:
            raise OriginUnavailable(f"{what}: response without Content-Length")
        if clen != length:
            # A 206 with fewer bytes means the range runs past the object's end; a 200
            # means the server ignored Range. Neither gets better by retrying.
            if resp.status == 206 and clen < length:
                raise ObjectTruncated(f"{what}: object ends {length - clen} bytes before the "
                                      "range does (it changed since it was indexed; re-run "
                                      "`p2pfs index`)")
            raise OriginError(f"{what}: expected {length} bytes, server sends {clen}"
                              + (" (Range ignored)" if resp.status == 200 else ""))
        # Uninitialized, not a bytearray: a bytearray is zero-filled, and on this VM touching
        # fresh memory costs about as much as receiving the data (profiled: the largest
        # single cost of a cold read). malloc'ed memory is reused after free (see
        # daemon.keep_freed_memory) and is fully overwritten below. Page-aligned, so the
        # disk cache can write it with O_DIRECT.
        view = aligned_empty(length) if into is None else into.cast("B")
        n = min(len(rest), length)
        view[:n] = rest[:n]
        flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
        while n < length:
            if time.monotonic() > deadline:
                raise TimeoutError
            k = sock.recv_into(view[n:], length - n, flags)
            if not k:
                raise OriginUnavailable(f"{what}: connection closed after {n} of {length} bytes")
            n += k
        return view, resp.keep_alive

    async def aclose(self) -> None:
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()


class _StaleConnection(Exception):
    pass
