"""One small HTTP/1.1 server (h11 on trio) for peers' chunk requests, /metrics and /healthz.

    GET /v1/chunk/...   peers' chunk requests (only with a handler): authenticated first,
                        then admitted, then answered by `handler` (docs/FORMAT.md)
    GET /metrics        Prometheus text of `registry` (unauthenticated)
    GET /healthz        200 once ready and not draining, else 503 (a readiness probe)

Bounds, so no client can hold the server: a request head is at most `max_head` bytes and
must arrive within `head_timeout` of its first byte; an idle keep-alive connection is
closed after `idle_timeout`; every piece of an answer must be taken within `send_timeout`;
at most `max_connections` connections are open. Admission: `max_uploads +
upload_queue` chunk requests are in progress at once; the handler (which may wait for the
owner's own fetch, sending `102 Processing` meanwhile) holds no upload slot, only sending
does: `max_uploads` answers are sent at once, and one that waited `queue_timeout` for a
send slot is refused. A request beyond the bound, or one refused so, gets 503 with
Retry-After, and so does every chunk request once draining. Admitting requests while they
wait for a flight matters: if they held the send slots, a cold owner's slots would all be
waiting on its origin, and its requesters, refused, would each fetch the chunk themselves. `upload_rate` caps the bytes/s of all chunk answers
together (a token bucket; 0 = no cap).

A request without a valid MAC gets 401 with an empty body and the connection is closed:
nothing of it is parsed beyond what the MAC check needs, and the handler never sees it.
Counters and states change only on the trio thread (no locks).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Awaitable, Callable

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..errors import ConfigError, P2PFSError, PeerMiss, ProtocolError
from . import _wire
from ._auth import Unauthorized, Verifier
from ._wire import ChunkRequest, RequestError

log = logging.getLogger("p2pfs.peer")

READ_SIZE = 64 * 1024
PIECE = 1024 * 1024  # bytes of a body per send (and per rate-cap reservation)
Handler = Callable[[ChunkRequest], Awaitable[tuple[object, str]]]
#: Result names counted in stats().requests, by answer.
RESULTS = {200: "ok", 400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "miss",
           405: "bad_method", 413: "too_large", 500: "error", 502: "failed", 503: "busy"}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerServerLimits:
    max_uploads: int = 16         # chunk answers in progress at once
    upload_queue: int = 64        # chunk requests waiting for one of those
    queue_timeout: float = 2.0    # longest wait in that queue (then 503)
    upload_rate: int = 0          # bytes/s of all chunk answers together; 0 = no cap
    max_connections: int = 1024
    max_head: int = 16 * 1024     # request line and headers, bytes
    head_timeout: float = 10.0    # first byte of a request to the end of its head
    idle_timeout: float = 60.0    # keep-alive connection without a request
    send_timeout: float = 10.0    # to take one piece (1 MiB) of an answer
    retry_after: int = 1          # seconds, in a 503's Retry-After
    progress_interval: float = 0.5  # seconds between 102 Processing while a handler works; 0: none

    def __post_init__(self) -> None:
        for name in ("max_uploads", "max_connections", "max_head", "retry_after"):
            if getattr(self, name) < 1:
                raise ConfigError(f"peer server: {name} must be >= 1")
        for name in ("upload_queue", "upload_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"peer server: {name} must be >= 0")
        for name in ("queue_timeout", "head_timeout", "idle_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"peer server: {name} must be > 0")


@dataclass(frozen=True, slots=True)
class PeerServerStats:
    requests: dict[str, int]  # by result (RESULTS values, and "draining")
    bytes_sent: int           # chunk body bytes sent
    active: int               # chunk answers in progress
    queued: int               # chunk requests waiting for admission
    connections: int          # accepted, ever
    open_connections: int
    refused_connections: int  # over max_connections
    ready: bool
    draining: bool


class TokenBucket:
    """A rate cap by reservation: `reserve(n, now)` takes n tokens, going into debt if need
    be, and says how long to wait before sending them. Concurrent senders queue up fairly
    behind each other's debt, so together they never exceed `rate` (after `burst`)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def reserve(self, n: int, now: float) -> float:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class _Close(Exception):
    """End this connection (its client timed out, broke the protocol or was refused)."""


class PeerServer:
    def __init__(self, host: str, port: int, *, verifier: Verifier | None = None,
                 handler: Handler | None = None, registry: CollectorRegistry | None = None,
                 limits: PeerServerLimits = PeerServerLimits(), name: str = "peers",
                 ready: bool = False, clock: Callable[[], float] = time.time) -> None:
        if handler is not None and verifier is None:
            raise ValueError("a chunk handler needs a verifier: chunk requests are always "
                             "authenticated")
        self.host, self.port, self.name = host, port, name
        self.verifier, self.handler, self.registry, self.limits = verifier, handler, registry, limits
        self._clock = clock  # wall clock: request timestamps are Unix seconds
        self._ready = ready
        self._draining = False
        self._drained = trio.Event()
        self._uploads = trio.CapacityLimiter(limits.max_uploads)
        rate = limits.upload_rate
        self._piece = min(PIECE, max(16 * 1024, rate // 10)) if rate else PIECE
        self._bucket = TokenBucket(rate, max(self._piece, rate / 10)) if rate else None
        self._listener: trio.SocketListener | None = None
        self._results: Counter[str] = Counter()
        self._bytes_sent = self._active = self._queued = 0
        self._accepted = self._open = self._refused = 0
        self._unauthorized_logged = -1e9

    # ------------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("not bound yet")
        return self.host, self._listener.socket.getsockname()[1]

    async def bind(self) -> tuple[str, int]:
        """Bind and listen (once); a host or port we cannot have is a ConfigError here, so
        a caller can bind before it starts anything else. Returns the bound address."""
        if self._listener is not None:
            return self.address
        try:
            family, type_, proto, _, sockaddr = (await trio.socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(min(1024, self.limits.max_connections))
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise ConfigError(f"cannot serve {self.name} at {_addr(self.host, self.port)}: "
                              f"{exc.strerror or exc}") from None
        self._listener = trio.SocketListener(sock)
        return self.address

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound (host, port) once listening."""
        bound = await self.bind()
        assert self._listener is not None
        try:
            async with trio.open_nursery() as nursery:
                log.info("serving %s at http://%s", self.name, _addr(*bound))
                task_status.started(bound)
                await trio.serve_listeners(self._connection, [self._listener],
                                           handler_nursery=nursery)
        finally:
            await self._listener.aclose()

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def drain(self) -> None:
        """Refuse chunk requests from now on (503) and fail /healthz; answers in progress
        finish (`wait_drained`). Keep-alive connections close after their next answer."""
        self._draining = True
        self._check_drained()

    async def wait_drained(self) -> None:
        """Until draining and no chunk answer is in progress or queued."""
        await self._drained.wait()

    def _check_drained(self) -> None:
        if self._draining and not self._active and not self._queued:
            self._drained.set()

    def stats(self) -> PeerServerStats:
        return PeerServerStats(dict(self._results), self._bytes_sent, self._active,
                               self._queued, self._accepted, self._open, self._refused,
                               self._ready, self._draining)

    # ------------------------------------------------------------------------ connections

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._open >= self.limits.max_connections:
            self._refused += 1
            await stream.aclose()
            return
        self._open += 1
        self._accepted += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        try:
            while (head := await self._next_request(conn, stream)) is not None:
                await self._route(conn, stream, head)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # one side said close (or a reply closed it)
                conn.start_next_cycle()
        except (_Close, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError, h11.LocalProtocolError):
            pass
        finally:
            self._open -= 1
            await stream.aclose()

    async def _next_request(self, conn: h11.Connection, stream: trio.SocketStream
                            ) -> h11.Request | None:
        """The next request's head (its empty body consumed), or None when the client
        closed or was idle too long. A broken or oversized head is answered and closes."""
        lim = self.limits
        try:
            event = conn.next_event()
            # Bytes of this head so far: reads never go past max_head, so an oversized head
            # is found without buffering more than the limit.
            buffered = len(conn.trailing_data[0])
            if event is h11.NEED_DATA:  # idle: nothing of a request yet
                with trio.move_on_after(lim.idle_timeout) as idle:
                    data = await stream.receive_some(max(1, lim.max_head - buffered))
                if idle.cancelled_caught:
                    return None
                buffered += len(data)
                conn.receive_data(data)
                event = conn.next_event()
            with trio.move_on_after(lim.head_timeout) as scope:
                head = None
                while True:
                    if event is h11.NEED_DATA:
                        if buffered >= lim.max_head:
                            raise h11.RemoteProtocolError(
                                f"request head over {lim.max_head} bytes", error_status_hint=431)
                        data = await stream.receive_some(lim.max_head - buffered)
                        buffered += len(data)
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        head = event
                    elif isinstance(event, h11.EndOfMessage) and head is not None:
                        return head
                    elif isinstance(event, h11.ConnectionClosed):
                        return None
                    else:  # a body on a GET (h11.Data), or anything unexpected
                        await self._reply(conn, stream, 400, b"request bodies are not accepted\n",
                                          close=True)
                        return None
                    event = conn.next_event()
            if scope.cancelled_caught:
                return None  # the head did not arrive in time: drop, nothing to answer
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._results[RESULTS.get(status, "bad_request")] += 1
            await self._reply(conn, stream, status, f"{exc}\n".encode(), close=True, fresh=True)
        return None

    async def _route(self, conn: h11.Connection, stream: trio.SocketStream,
                     head: h11.Request) -> None:
        target = head.target.decode("latin-1")
        method = head.method.decode("latin-1")
        path = target.partition("?")[0]
        if path.startswith(_wire.PREFIX) and self.handler is not None:
            await self._chunk(conn, stream, method, target, head.headers)
            return
        if path not in ("/metrics", "/healthz") or (path == "/metrics" and self.registry is None):
            await self._reply(conn, stream, 404, b"not found\n")
        elif method != "GET":
            await self._reply(conn, stream, 405, b"GET only\n", [(b"allow", b"GET")])
        elif path == "/metrics":
            await self._reply(conn, stream, 200, generate_latest(self.registry),
                              [(b"content-type", CONTENT_TYPE_LATEST.encode())])
        elif self._ready and not self._draining:
            await self._reply(conn, stream, 200, b"ok\n")
        else:
            await self._reply(conn, stream, 503, b"draining\n" if self._draining else b"not ready\n")

    # ------------------------------------------------------------------------ chunks

    async def _chunk(self, conn: h11.Connection, stream: trio.SocketStream, method: str,
                     target: str, headers: list[tuple[bytes, bytes]]) -> None:
        assert self.verifier is not None and self.handler is not None
        try:
            _wire.authenticate(self.verifier, method=method, target=target, headers=headers,
                               now=self._clock())
        except Unauthorized as exc:
            self._results["unauthorized"] += 1
            self._log_unauthorized(stream, exc.reason)
            await self._reply(conn, stream, 401, b"", close=True)
            return
        if self._draining:
            self._results["draining"] += 1
            await self._busy(conn, stream, b"draining\n")
            return
        try:
            req = _wire.parse_request(method, target, headers)
        except RequestError as exc:
            await self._refuse(conn, stream, exc.status, exc)
            return
        lim = self.limits
        if self._active + self._queued >= lim.max_uploads + lim.upload_queue:
            self._results["busy"] += 1
            await self._busy(conn, stream, b"upload queue full\n")
            return
        self._queued += 1  # preparing (the handler) or waiting for a send slot
        try:
            await self._answer(conn, stream, req)
        finally:
            self._queued -= 1
            self._check_drained()

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream,
                      req: ChunkRequest) -> None:
        assert self.handler is not None
        try:
            buf, source = await self._handle_with_progress(conn, stream, req)
        except PeerMiss as exc:
            await self._refuse(conn, stream, 404, exc)
            return
        except ProtocolError as exc:  # e.g. an origin this node does not serve
            await self._refuse(conn, stream, getattr(exc, "status", 403), exc)
            return
        except P2PFSError as exc:  # the owner's own fetch failed
            await self._refuse(conn, stream, 502, exc)
            return
        except Exception:
            log.exception("peer request for chunk %s failed", req.locator.digest[:12])
            await self._refuse(conn, stream, 500, "internal error")
            return
        view = memoryview(buf).cast("B")
        if len(view) != req.locator.size or source not in _wire.SOURCES:
            log.error("peer handler returned %d bytes from %r for a %d-byte chunk", len(view),
                      source, req.locator.size)
            await self._refuse(conn, stream, 500, "internal error")
            return
        lim = self.limits
        admitted = False
        with trio.move_on_after(lim.queue_timeout):
            await self._uploads.acquire()
            admitted = True
        if not admitted:
            self._results["busy"] += 1
            await self._busy(conn, stream, b"waited too long for a send slot\n")
            return
        self._queued -= 1
        self._active += 1
        try:
            await self._send_chunk(conn, stream, view, source)
        finally:
            self._active -= 1
            self._queued += 1  # the caller's count ends it
            self._uploads.release()

    async def _send_chunk(self, conn: h11.Connection, stream: trio.SocketStream,
                          view: memoryview, source: str) -> None:
        self._results["ok"] += 1
        lim = self.limits
        data = conn.send(h11.Response(status_code=200, reason=b"OK", headers=[
            (b"content-length", str(len(view)).encode()),
            (b"content-type", b"application/octet-stream"),
            (b"x-p2pfs-source", source.encode()),
            *self._closing()]))
        with trio.fail_after(lim.send_timeout):
            await stream.send_all(data)
        for start in range(0, len(view), self._piece):
            piece = view[start:start + self._piece]
            if self._bucket is not None:
                delay = self._bucket.reserve(len(piece), trio.current_time())
                if delay:
                    await trio.sleep(delay)
            with trio.fail_after(lim.send_timeout):
                for part in conn.send_with_data_passthrough(h11.Data(data=piece)):
                    await stream.send_all(part)
            self._bytes_sent += len(piece)
        conn.send(h11.EndOfMessage())  # no bytes with a Content-Length

    async def _handle_with_progress(self, conn: h11.Connection, stream: trio.SocketStream,
                                    req: ChunkRequest) -> tuple[object, str]:
        """Run the handler, sending `102 Processing` every `progress_interval` while it
        works (the owner fetching from the origin): the requester's stall timeout then
        tells a dead peer (silent) from a busy one (a head a while), without a deadline
        long enough for the slowest origin."""
        assert self.handler is not None
        every = self.limits.progress_interval

        async def progress() -> None:
            while True:
                await trio.sleep(every)
                data = conn.send(h11.InformationalResponse(status_code=102, reason=b"Processing",
                                                           headers=[]))
                with trio.CancelScope(shield=True):  # never half a head on the wire
                    with trio.move_on_after(self.limits.send_timeout) as sent:
                        await stream.send_all(data)
                if sent.cancelled_caught:
                    return  # the requester stopped reading; the answer's send will tell

        if not every:
            return await self.handler(req)
        outcome: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            try:
                outcome.append(await self.handler(req))
            except Exception as exc:  # raised below, outside the nursery (no group)
                outcome.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    async def _refuse(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                      why: object) -> None:
        self._results[RESULTS.get(status, "error")] += 1
        await self._reply(conn, stream, status, f"{why}\n".encode()[:1024])

    async def _busy(self, conn: h11.Connection, stream: trio.SocketStream, text: bytes) -> None:
        await self._reply(conn, stream, 503, text,
                          [(b"retry-after", str(self.limits.retry_after).encode())])

    def _log_unauthorized(self, stream: trio.SocketStream, reason: str) -> None:
        now = trio.current_time()
        if now - self._unauthorized_logged >= 10.0:  # at most one line per 10 s
            self._unauthorized_logged = now
            try:
                who = stream.socket.getpeername()[0]
            except OSError:
                who = "?"
            log.warning("refused a peer request from %s: %s (check the cluster token)", who,
                        reason)

    # ------------------------------------------------------------------------ replies

    def _closing(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")] if self._draining else []

    async def _reply(self, conn: h11.Connection, stream: trio.SocketStream, status: int,
                     body: bytes, headers: list[tuple[bytes, bytes]] | None = None, *,
                     close: bool = False, fresh: bool = False) -> None:
        """A small answer with a body in memory. `fresh`: the request broke h11's state, so
        the answer goes out through a new connection state (which then closes)."""
        if fresh:
            conn = h11.Connection(h11.SERVER)
            close = True
        extra = [(b"connection", b"close")] if close else self._closing()
        if body:
            extra.append((b"content-type", b"text/plain; charset=utf-8"))
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        data = conn.send(h11.Response(status_code=status, reason=reason, headers=[
            (b"content-length", str(len(body)).encode()), *(headers or []), *extra]))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        with trio.fail_after(self.limits.send_timeout):
            await stream.send_all(data)
        if close:
            raise _Close


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
