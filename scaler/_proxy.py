"""The queue proxy: an HTTP/1.1 reverse proxy (trio + h11) in front of the replicas.

Every request takes a ticket from the `Dispatcher` (the pure core): it is sent to the
least-loaded ready replica with a free slot, or waits in the bounded FIFO queue until
one frees, a replica becomes ready, or its deadline passes (503 + Retry-After; nothing
is dropped silently). A replica that dies before sending a response byte gets the
request retried elsewhere. This is the one place errors become status codes:
queue full/timeout and no connection slot 503, replica broken 502, replica too slow 504,
and the client's own faults 400 (broken HTTP), 408 (too slow), 413 (body), 431 (head).

Client connections are bounded too: `max_connections` slots (`_slots.py`). A connection
without one waits until its queue deadline (then 503), and at most `max_connections` wait
or linger (beyond that, 503 at once). A request head must arrive within `head_timeout_s`
of its first byte, the next request within `idle_timeout_s`; while others wait, a
connection without a whole head after `busy_head_timeout_s` gives its slot up, and a
response says `Connection: close`. An error answer is followed by a graceful close without
a slot (`_linger`), so a client still sending reads it instead of a reset.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Callable

import h11
import trio
from prometheus_client.exposition import generate_latest

from . import _http, _metrics, _slots
from ._config import ProxyConfig
from ._dispatch import Dispatcher, QueueFull, Ticket
from ._errors import ProtocolError, ReplicaTimeout, ReplicaUnavailable
from ._metrics import ConnectionStats, Snapshot

log = logging.getLogger("scaler.proxy")

Reply = tuple[int, _http.Headers, bytes]
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class QueueProxy:
    def __init__(self, config: ProxyConfig, dispatcher: Dispatcher, *,
                 snapshot: Callable[[], Snapshot], poke: Callable[[], None],
                 replica_failed: Callable[[str], None],
                 replica_answered: Callable[[str], None] = lambda ep_id: None,
                 status: Callable[[], dict] = dict,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.config, self.dispatcher = config, dispatcher
        self._poke, self._replica_failed = poke, replica_failed
        self._replica_answered, self._status = replica_answered, status
        self._clock = clock
        self._slots = _slots.Slots(config.max_connections, grace=config.busy_head_timeout_s,
                                   clock=clock)
        #: Connections closing gracefully after an error answer (they hold no slot).
        self._closing = 0
        self._rejected = 0
        self._client_errors: Counter[int] = Counter()
        self._registry = _metrics.registry(snapshot, self.statistics)

    @staticmethod
    def wake(tickets: list[Ticket]) -> None:
        for t in tickets:
            if t.token is not None:
                t.token.set()

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(open=self._slots.open, awaiting_head=self._slots.unready,
                               waiting=self._slots.waiting, closing=self._closing,
                               rejected=self._rejected,
                               client_errors=tuple(sorted(self._client_errors.items())))

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

    # ------------------------------------------------------------------ connections
    async def _connection(self, stream: trio.SocketStream) -> None:
        c = self.config
        async with stream:
            deadline: float | None = None
            claim = self._slots.try_claim()
            if claim is None:
                if self._slots.waiting + self._closing >= c.max_connections:
                    # Past both bounds: answer, but spend no more time on it.
                    self._rejected += 1
                    await self._refuse(h11.Connection(h11.SERVER), stream,
                                       self._busy("too many connections"))
                    return
                deadline = self._clock() + c.queue_timeout_s
                claim = await self._slots.claim(deadline)
                if claim is None:
                    self._rejected += 1
                    if await self._refuse(h11.Connection(h11.SERVER), stream, self._busy(
                            "no connection slot free before the queue deadline")):
                        await self._linger(stream)
                    return
            try:
                refused = await self._serve(stream, claim, deadline)
            finally:
                self._slots.release(claim)
            if refused:
                await self._linger(stream)

    async def _serve(self, stream: trio.SocketStream, claim: _slots.Claim,
                     deadline: float | None) -> bool:
        """Requests on one connection until either side closes or the slot is taken away;
        True when that was an error answer to the client, which `_linger` should follow.
        `deadline`: the first request's queue deadline when it already waited for its slot."""
        c = self.config
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=c.max_header_bytes)
        while True:
            try:
                got = await self._next_head(conn, stream, claim)
                if got is None:
                    return False
                head, began = got
                with trio.fail_at(began + c.client_timeout_s):
                    body = await _http.read_body(conn, stream, head, max_body=c.max_body_bytes)
            except ProtocolError as exc:
                self._client_errors[exc.status] += 1
                return await self._refuse(conn, stream, _http.simple(exc.status, f"{exc}\n"))
            except trio.TooSlowError:
                self._client_errors[408] += 1
                return await self._refuse(conn, stream, _http.simple(408, "request not received in time\n"))
            except _GONE:
                return False
            req = _http.Message(headers=list(head.headers), body=body, method=head.method,
                                target=head.target)
            reply = await self._route(req, deadline)
            deadline = None
            try:
                # While connections wait for a slot, this one is handed over after the response.
                await _http.write_response(conn, stream, *reply, close=self._slots.contended)
            except _GONE:
                return False
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return False  # either side said close, and the request has been read whole
            conn.start_next_cycle()

    async def _next_head(self, conn: h11.Connection, stream: trio.SocketStream,
                         claim: _slots.Claim) -> tuple[h11.Request, float] | None:
        """The next request head and when its first byte came. None: close without an
        answer (the client closed, idle_timeout_s, or the slot was taken while idle).
        TooSlowError: head_timeout_s, or the slot was taken mid-head."""
        c = self.config
        began: float | None = None
        with self._slots.evictable(claim, self._clock()):
            with trio.move_on_after(c.idle_timeout_s):
                if not await _http.wait_for_request(conn, stream, max_head=c.max_header_bytes):
                    return None
                began = self._clock()
            if began is not None:
                with trio.move_on_at(began + c.head_timeout_s):
                    head = await _http.read_head(conn, stream, max_head=c.max_header_bytes)
                    if claim.held:  # else evicted just as the head completed
                        return head, began
        if began is None:
            return None
        raise trio.TooSlowError

    async def _refuse(self, conn: h11.Connection, stream: trio.SocketStream, reply: Reply) -> bool:
        """An error answer saying Connection: close; False when the client is gone or does
        not take it within linger_s."""
        with trio.move_on_after(self.config.linger_s):
            try:
                await _http.write_response(conn, stream, *reply, close=True)
                return True
            except (h11.LocalProtocolError, *_GONE):
                return False
        return False

    async def _linger(self, stream: trio.SocketStream) -> None:
        """The graceful close after an error answer, without a slot. Lingering connections
        count with the waiting ones against max_connections; past that, close at once."""
        if self._slots.waiting + self._closing >= self.config.max_connections:
            return
        self._closing += 1
        try:
            await _http.close_gracefully(stream, linger=self.config.linger_s)
        finally:
            self._closing -= 1

    # ------------------------------------------------------------------ requests
    async def _route(self, req: _http.Message, deadline: float | None) -> Reply:
        path = req.target.split(b"?", 1)[0]
        if path == b"/metrics" and req.method == b"GET":
            return 200, [(b"content-type", _metrics.CONTENT_TYPE.encode())], \
                generate_latest(self._registry)
        if path == b"/-/healthz":
            return _http.simple(200, "ok\n")
        if path == b"/-/status" and req.method == b"GET":
            return 200, [(b"content-type", b"application/json")], \
                json.dumps(self._status()).encode()
        return await self._forward(req, deadline)

    def _busy(self, why: str) -> Reply:
        return _http.simple(503, f"{why}\n", [(b"retry-after", str(self.config.retry_after_s).encode())])

    async def _forward(self, req: _http.Message, deadline: float | None) -> Reply:
        c = self.config
        try:
            ticket = self.dispatcher.submit(self._clock(), deadline=deadline)
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
                self._replica_answered(ep.id)
                return resp.status, resp.headers, resp.body
        finally:
            if held:
                # Error reply or cancellation: give the slot or queue place back.
                self.wake(self.dispatcher.cancel(ticket, self._clock()))
