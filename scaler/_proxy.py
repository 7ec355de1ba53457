"""The queue proxy: an HTTP/1.1 reverse proxy (trio + h11) in front of the replicas.

Every request takes a ticket from the `Dispatcher` (the pure core): it is sent to the
least-loaded ready replica with a free slot, or waits in the bounded FIFO queue until
one frees, a replica becomes ready, or its deadline passes (503 + Retry-After; nothing
is dropped silently). A replica that dies before sending a response byte gets the
request retried elsewhere. This is the one place replica errors become status codes:
queue full/timeout 503, replica broken 502, replica too slow 504.
"""

from __future__ import annotations

import logging
from typing import Callable

import h11
import trio

from . import _http
from ._config import ProxyConfig
from ._dispatch import Dispatcher, QueueFull, Ticket
from ._errors import ProtocolError, ReplicaTimeout, ReplicaUnavailable
from ._metrics import Snapshot, render

log = logging.getLogger("scaler.proxy")

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


class QueueProxy:
    def __init__(self, config: ProxyConfig, dispatcher: Dispatcher, *,
                 snapshot: Callable[[], Snapshot], poke: Callable[[], None],
                 replica_failed: Callable[[str], None],
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.config, self.dispatcher = config, dispatcher
        self._snapshot, self._poke, self._replica_failed = snapshot, poke, replica_failed
        self._clock = clock
        self._connections = trio.CapacityLimiter(config.max_connections)

    @staticmethod
    def wake(tickets: list[Ticket]) -> None:
        for t in tickets:
            if t.token is not None:
                t.token.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        port = listeners[0].socket.getsockname()[1]
        log.info("proxy listening on %s:%d", self.config.host, port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expirer)
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(port)

    async def _expirer(self) -> None:
        # Waiters time out on their own; this only keeps queue stats honest between them.
        while True:
            await trio.sleep(1.0)
            self.dispatcher.expire(self._clock())

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with self._connections, stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
            while True:
                try:
                    with trio.fail_after(self.config.client_timeout_s):
                        req = await _http.read_request(conn, stream, max_body=self.config.max_body_bytes)
                    if req is None:
                        return
                    reply = await self._route(req)
                except ProtocolError as exc:
                    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                        return
                    code = 413 if "larger" in str(exc) else 400
                    reply = _http.simple(code, f"{exc}\n", [(b"connection", b"close")])
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                try:
                    await _http.write_response(conn, stream, *reply)
                    conn.start_next_cycle()
                except (h11.LocalProtocolError, trio.BrokenResourceError,
                        trio.ClosedResourceError, OSError):
                    return

    async def _route(self, req: _http.Message) -> Reply:
        path = req.target.split(b"?", 1)[0]
        if path == b"/metrics" and req.method == b"GET":
            return 200, [(b"content-type", b"text/plain; version=0.0.4")], \
                render(self._snapshot()).encode()
        if path == b"/-/healthz":
            return _http.simple(200, "ok\n")
        return await self._forward(req)

    def _busy(self, why: str) -> Reply:
        return _http.simple(503, f"{why}\n", [(b"retry-after", str(self.config.retry_after_s).encode())])

    async def _forward(self, req: _http.Message) -> Reply:
        c = self.config
        try:
            ticket = self.dispatcher.submit(self._clock())
        except QueueFull:
            return self._busy("queue full")
        if ticket.endpoint is None and not self.dispatcher.routable():
            self._poke()
        held = True
        try:
            while True:
                if ticket.endpoint is None:
                    ticket.token = trio.Event()
                    with trio.move_on_at(ticket.deadline):
                        await ticket.token.wait()
                    if ticket.endpoint is None:
                        self.dispatcher.expire(self._clock())
                        self.dispatcher.cancel(ticket, self._clock())
                        held = False
                        return self._busy("no replica free before the queue deadline")
                ep = ticket.endpoint
                started = self._clock()
                try:
                    resp = await _http.exchange(ep.host, ep.port, req, connect_timeout=c.connect_timeout_s,
                                                timeout=c.request_timeout_s, max_body=c.max_body_bytes)
                except ReplicaUnavailable as exc:
                    retry = ticket.attempts <= c.max_retries
                    log.warning("replica %s failed before answering (%s); %s", ep.id, exc,
                                "retrying" if retry else "giving up")
                    self.wake(self.dispatcher.fail(ticket, self._clock(), retry=retry))
                    self._replica_failed(ep.id)
                    if retry:
                        continue
                    held = False
                    return _http.simple(502, f"replica failed: {exc}\n")
                except ReplicaTimeout as exc:
                    return _http.simple(504, f"{exc}\n")
                except ProtocolError as exc:
                    return _http.simple(502, f"bad replica response: {exc}\n")
                held = False
                self.wake(self.dispatcher.finish(ticket, self._clock(), self._clock() - started))
                return resp.status, resp.headers, resp.body
        finally:
            if held:
                # Error reply or cancellation: give the slot or queue place back.
                self.wake(self.dispatcher.cancel(ticket, self._clock()))
