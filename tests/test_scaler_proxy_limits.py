"""The queue proxy's bounds under hostile or unlucky clients, over real loopback sockets:
connection slots (503 within the queue deadline, slowloris), the request head limit (431),
hop-by-hop headers, oversized bodies (413 the client reads, not a reset).

Clients here write raw bytes and read with plain h11, so what reaches the proxy is exactly
what the test says (scaler._http would tidy the request on the way out)."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h11
import pytest
import trio

from scaler import ConcurrencyPolicy, ConfigError, Endpoint, PolicyConfig, ProxyConfig, run_proxy

from scaler_helpers import StaticActuator

GET = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    seconds: float = 0.0


async def echo_replica(delay: float, seen: list[dict], *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answers every request after `delay` with a JSON of the headers it got; its answer
    carries hop-by-hop headers of its own. Plain h11, heads up to 1 MiB."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        body = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 16))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
        got = {"headers": [[k.decode(), v.decode()] for k, v in head.headers],
               "body": len(body), "head_bytes": sum(len(k) + len(v) for k, v in head.headers)}
        seen.append(got)
        await trio.sleep(delay)
        out = json.dumps(got).encode()
        headers = [(b"content-length", str(len(out)).encode()), (b"keep-alive", b"timeout=9"),
                   (b"proxy-authenticate", b"Basic"), (b"connection", b"x-replica-private"),
                   (b"x-replica-private", b"1"), (b"x-replica-public", b"1")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers))
                              + conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage()))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@asynccontextmanager
async def proxied(*, delay: float = 0.0, **config):
    seen: list[dict] = []
    async with trio.open_nursery() as nursery:
        rport = await nursery.start(echo_replica, delay, seen)
        act = StaticActuator(Endpoint("r", "127.0.0.1", rport))
        cfg = ProxyConfig(port=0, **config)
        run = await nursery.start(run_proxy, cfg, ConcurrencyPolicy(PolicyConfig(min_replicas=1)), act)
        yield run.port, seen, run
        nursery.cancel_scope.cancel()


async def read_answer(stream: trio.abc.Stream) -> Answer:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))  # state only
    conn.send(h11.EndOfMessage())
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
        elif isinstance(event, h11.Response):
            resp = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Answer(resp.status_code, dict(resp.headers), body)


async def roundtrip(port: int, raw: bytes = GET, *, timeout: float = 10) -> Answer:
    """Send `raw` whole, then read the answer: what a naive client does."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            answer = await read_answer(stream)
    answer.seconds = trio.current_time() - start
    return answer


async def closed_within(stream: trio.abc.Stream, seconds: float) -> bool:
    """Whether the peer closes (EOF or reset) within `seconds`; what it sends is ignored."""
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


# ------------------------------------------------------------------------ connection slots

async def test_connections_beyond_the_limit_get_503_within_the_queue_timeout():
    # 4 slots, replicas take 1 s, 24 clients at once: a client gets a slot and its answer
    # within queue_timeout_s + 1 s, or a 503 with Retry-After at queue_timeout_s.
    async with proxied(delay=1.0, max_connections=4, max_concurrency=50, queue_timeout_s=1.0,
                       retry_after_s=3) as (port, seen, run):
        answers: list[Answer] = []

        async def client() -> None:
            answers.append(await roundtrip(port, timeout=15))

        async with trio.open_nursery() as nursery:
            for _ in range(24):
                nursery.start_soon(client)
        ok = [a for a in answers if a.status == 200]
        busy = [a for a in answers if a.status == 503]
        assert len(ok) + len(busy) == 24
        assert len(ok) >= 4 and len(busy) >= 12, [a.status for a in answers]
        assert all(a.headers[b"retry-after"] == b"3" for a in busy)
        assert max(a.seconds for a in busy) < 2.5, sorted(a.seconds for a in busy)
        assert max(a.seconds for a in ok) < 3.5, sorted(a.seconds for a in ok)
        stats = run.proxy.statistics()
        assert stats.rejected == len(busy) and stats.waiting == 0


async def test_silent_connections_give_their_slots_to_a_real_request():
    # Each holds a slot with idle_timeout_s 30 s; a waiting request evicts the oldest once
    # it has held its slot busy_head_timeout_s (1 s) without sending a request.
    async with proxied(max_connections=4) as (port, seen, _):
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        await trio.sleep(0.2)  # accepted, each holding a slot
        answer = await roundtrip(port, timeout=5)
        assert answer.status == 200 and answer.seconds < 2.0
        # The oldest silent connection was closed to make room.
        assert await closed_within(silent[0], 1.0)
        for s in silent:
            await s.aclose()


async def trickle(stream: trio.SocketStream) -> None:
    """A slowloris: a request head, one header line every 0.1 s, never finished."""
    try:
        await stream.send_all(b"GET /x HTTP/1.1\r\n")
        for i in range(300):
            await stream.send_all(b"x-%d: y\r\n" % i)
            await trio.sleep(0.1)
    except trio.BrokenResourceError:
        pass


async def test_slowloris_holding_every_slot_gives_way_to_real_requests():
    # Every slot trickles a head; head_timeout_s is its default 10 s. Three real requests
    # wait: each gets a slot once the oldest head has taken busy_head_timeout_s (1 s).
    async with proxied(max_connections=4) as (port, seen, run):
        async with trio.open_nursery() as nursery:
            loris = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
            for s in loris:
                nursery.start_soon(trickle, s)
            await trio.sleep(0.2)
            answers: list[Answer] = []

            async def client() -> None:
                answers.append(await roundtrip(port, timeout=5))

            async with trio.open_nursery() as clients:
                for _ in range(3):
                    clients.start_soon(client)
            assert [a.status for a in answers] == [200] * 3
            assert max(a.seconds for a in answers) < 2.5, [a.seconds for a in answers]
            closed = [await closed_within(s, 1.0) for s in loris]  # the rest hold 10 s
            assert closed.count(True) == 3  # one per waiting request, no more
            nursery.cancel_scope.cancel()
        assert len(seen) == 3  # no slowloris head was forwarded
        assert dict(run.proxy.statistics().client_errors)[408] == 3


async def test_slowloris_is_dropped_after_the_head_timeout_without_contention():
    async with proxied(max_connections=8, head_timeout_s=1.0, busy_head_timeout_s=0.5) as (port, seen, run):
        async with trio.open_nursery() as nursery:
            loris = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
            for s in loris:
                nursery.start_soon(trickle, s)
            start = trio.current_time()
            for s in loris:  # each got its 408 and was closed
                assert await closed_within(s, 3.0)
            assert trio.current_time() - start < 2.5
            nursery.cancel_scope.cancel()
        assert not seen
        assert dict(run.proxy.statistics().client_errors)[408] == 4


async def test_keep_alive_serves_many_requests_on_one_connection_quickly():
    async with proxied(max_connections=4) as (port, seen, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            for _ in range(20):
                await stream.send_all(GET)
                assert (await read_answer(stream)).status == 200
            assert trio.current_time() - start < 4.0
        assert len(seen) == 20


# ------------------------------------------------------------------------ heads and headers

def _head(size: int) -> bytes:
    """A GET whose head is exactly `size` bytes."""
    start, end = b"GET /x HTTP/1.1\r\nhost: t\r\nx-pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


async def test_request_head_over_the_documented_limit_is_431_and_not_forwarded():
    async with proxied() as (port, seen, _):  # max_header_bytes: 64 KiB
        assert (await roundtrip(port, _head(64 * 1024))).status == 200
        for size in (64 * 1024 + 1, 100 * 1024, 127 * 1024):
            answer = await roundtrip(port, _head(size))
            assert answer.status == 431 and answer.headers[b"connection"] == b"close"
        assert len(seen) == 1


async def test_broken_http_is_400():
    async with proxied() as (port, seen, _):
        answer = await roundtrip(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert answer.status == 400 and not seen


async def test_hop_by_hop_headers_reach_neither_side():
    raw = (b"POST /x HTTP/1.1\r\nhost: t\r\n"
           b"proxy-authorization: Basic c2VjcmV0\r\n"
           b"connection: keep-alive, x-client-private\r\nx-client-private: 1\r\n"
           b"keep-alive: timeout=5\r\nte: trailers\r\ntrailer: x-t\r\nupgrade: websocket\r\n"
           b"proxy-connection: keep-alive\r\nx-client-public: 1\r\n"
           b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    async with proxied() as (port, seen, _):
        answer = await roundtrip(port, raw)
        assert answer.status == 200
        got = dict(seen[0]["headers"])
        assert seen[0]["body"] == 5 and got["content-length"] == "5"
        assert got["x-client-public"] == "1"
        for name in ("proxy-authorization", "x-client-private", "keep-alive", "te", "trailer",
                     "upgrade", "proxy-connection", "transfer-encoding"):
            assert name not in got, name
        assert got["connection"] == "close"  # the proxy's own, to the replica
        assert answer.headers[b"x-replica-public"] == b"1"
        for name in (b"proxy-authenticate", b"keep-alive", b"x-replica-private"):
            assert name not in answer.headers, name


# ------------------------------------------------------------------------ bodies

@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_body_gets_a_413_the_client_reads(chunked):
    body = b"x" * (8 << 20)
    if chunked:
        raw = (b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                          for c in (body[i:i + 65536] for i in range(0, len(body), 65536)))
               + b"0\r\n\r\n")
    else:
        raw = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    async with proxied(max_body_bytes=64 * 1024) as (port, seen, run):
        answer = await roundtrip(port, raw)
        assert answer.status == 413 and answer.headers[b"connection"] == b"close"
        assert not seen
        # and the proxy is fine afterwards
        assert (await roundtrip(port)).status == 200
        assert dict(run.proxy.statistics().client_errors)[413] == 1


async def test_oversized_body_after_expect_100_continue_is_refused_unsent():
    async with proxied(max_body_bytes=1000) as (port, seen, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PUT /x HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
                                      b"content-length: 1000000\r\n\r\n")
                assert (await read_answer(stream)).status == 413
        assert not seen


async def test_expect_100_continue_gets_a_100_before_the_body():
    async with proxied() as (port, seen, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PUT /x HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
                                      b"content-length: 5\r\n\r\n")
                with trio.fail_after(0.5):  # curl waits 1 s before sending anyway
                    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 ")
                await stream.send_all(b"hello")
                assert (await read_answer(stream)).status == 200
        assert seen[0]["body"] == 5


@pytest.mark.parametrize("bad", [{"head_timeout_s": 0}, {"linger_s": -1},
                                 {"max_header_bytes": 0}, {"busy_head_timeout_s": 20},
                                 {"head_timeout_s": 40}])
def test_proxy_config_refuses_bad_limits(bad):
    with pytest.raises(ConfigError):
        ProxyConfig(**bad)
