"""The queue proxy's core (Dispatcher) exactly, then the proxy over loopback with an
in-process replica: queue bound and deadline answer 503 + Retry-After, bodies are
bounded, /metrics shows the signal."""

from __future__ import annotations

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from scaler import ConcurrencyPolicy, Dispatcher, Endpoint, PolicyConfig, ProxyConfig, run_proxy
from scaler import _http, _metrics
from scaler._dispatch import QueueFull
from scaler._errors import MetricsError

from scaler_helpers import StaticActuator

A, B = Endpoint("a", "h", 1), Endpoint("b", "h", 2)


def test_dispatch_limits_queues_fifo_and_routes_least_loaded():
    d = Dispatcher(max_concurrency=2, max_queue=2, queue_timeout_s=10)
    d.add_endpoint(A, 0)
    d.add_endpoint(B, 0)
    t = [d.submit(0) for _ in range(4)]
    assert [x.endpoint.id for x in t] == ["a", "b", "a", "b"]  # least loaded, ties in order
    q1, q2 = d.submit(1), d.submit(2)
    assert q1.endpoint is None and q2.endpoint is None
    with pytest.raises(QueueFull):
        d.submit(3)
    woken = d.finish(t[1], 4, service_s=4.0)
    assert woken == [q1] and q1.endpoint == B  # FIFO: the oldest waiter first
    assert d.statistics().concurrency == 5 and d.statistics().rejected_full == 1
    assert d.expire(12.5) == [q2] and d.statistics().rejected_timeout == 1


def test_dispatch_retry_goes_to_the_head_and_avoids_the_dead_endpoint():
    d = Dispatcher(max_concurrency=1, max_queue=5, queue_timeout_s=10)
    d.add_endpoint(A, 0)
    d.add_endpoint(B, 0)
    ta, tb, tq = d.submit(0), d.submit(0), d.submit(0)
    assert tq.endpoint is None
    d.fail(ta, 1, retry=True)  # A died: ta waits at the head, A is gone
    assert ta.endpoint is None and [e.id for e in d.routable()] == ["b"]
    woken = d.finish(tb, 2)
    assert woken == [ta] and ta.endpoint == B and tq.endpoint is None
    assert d.statistics().retries == 1


def test_dispatch_drain_keeps_in_flight_until_done():
    d = Dispatcher(max_concurrency=4, max_queue=5, queue_timeout_s=10)
    d.add_endpoint(A, 0)
    t = d.submit(0)
    assert d.remove_endpoint("a", 1) == 1 and d.routable() == []
    assert d.submit(1).endpoint is None  # nothing routable: it queues
    d.finish(t, 2)
    assert d.in_flight("a") == 0


def test_dispatch_sample_is_a_time_average():
    d = Dispatcher(max_concurrency=1, max_queue=5, queue_timeout_s=100)
    d.sample(0)
    d.add_endpoint(A, 0)
    t1 = d.submit(0)
    d.submit(0)  # queued
    d.finish(t1, 5, service_s=5)  # at t=5 the queued one starts
    s = d.sample(10)
    # concurrency 2 for 5 s then 1 for 5 s; queue 1 for 5 s
    assert s.concurrency == pytest.approx(1.5) and s.queued == pytest.approx(0.5)
    assert s.arrival_rate == pytest.approx(0.2) and s.service_s == 5


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a text exposition, read with prometheus_client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


SNAP = _metrics.Snapshot(in_flight=3, queued=4, ready=2, starting=1, standby=2, desired=3,
                         stable_concurrency=5.5, panic_concurrency=7.25, panicking=True,
                         accepted=10, served=6, rejected_full=1, rejected_timeout=2,
                         failed=0, retries=1, queue_delay_sum_s=1.5, queue_delay_count=6)


def test_metrics_render_is_a_valid_exposition_with_stable_names():
    conns = _metrics.ConnectionStats(open=5, awaiting_head=2, waiting=1, closing=0, rejected=4,
                                     client_errors=((408, 3), (431, 1)))
    got = samples(_metrics.render(SNAP, conns))
    assert got[("scaler_concurrency", frozenset())] == 7
    assert got[("scaler_concurrency_average", frozenset({("window", "panic")}))] == 7.25
    assert got[("scaler_replicas", frozenset({("state", "standby")}))] == 2
    assert got[("scaler_requests_total", frozenset({("outcome", "rejected_queue_timeout")}))] == 2
    assert got[("scaler_retries_total", frozenset())] == 1
    assert got[("scaler_queue_delay_seconds_count", frozenset())] == 6
    assert got[("scaler_queue_delay_seconds_sum", frozenset())] == 1.5
    assert got[("scaler_connections", frozenset({("state", "waiting")}))] == 1
    assert got[("scaler_connections_rejected_total", frozenset())] == 4
    assert got[("scaler_client_errors_total", frozenset({("status", "408")}))] == 3
    types = {f.name: f.type for f in text_string_to_metric_families(_metrics.render(SNAP))}
    assert types["scaler_requests"] == "counter" and types["scaler_concurrency"] == "gauge"
    assert types["scaler_queue_delay_seconds"] == "summary"


def test_metrics_value_reads_one_sample_or_says_why_not():
    text = _metrics.render(SNAP)
    assert _metrics.value(text, "scaler_concurrency") == 7
    assert _metrics.value(text, "scaler_requests_total", {"outcome": "served"}) == 6
    assert _metrics.value("scaler_concurrency 9.5\n", "scaler_concurrency") == 9.5  # untyped
    for bad in ("scaler_concurrency{window= 1\n", "scaler_concurrency one\n", "{}\n"):
        with pytest.raises(MetricsError):
            _metrics.value(bad, "scaler_concurrency")
    with pytest.raises(MetricsError, match="not found"):
        _metrics.value(text, "scaler_concurrency", {"window": "x"})


# ----------------------------------------------------------------------------- over loopback

async def slow_replica(delay: float, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream):
        # Plain h11, not the module under test.
        conn = h11.Connection(h11.SERVER)
        body = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
        await trio.sleep(delay)
        out = b"done:" + body
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            (b"content-length", str(len(out)).encode())])) + conn.send(h11.Data(data=out))
            + conn.send(h11.EndOfMessage()))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _post(port: int, body: bytes) -> _http.Message:
    req = _http.Message(headers=[], body=body, method=b"POST", target=b"/x")
    return await _http.exchange("127.0.0.1", port, req, connect_timeout=5, timeout=10,
                                max_body=1 << 20)


@pytest.mark.trio
async def test_queue_full_and_deadline_answer_503_with_retry_after():
    cfg = ProxyConfig(port=0, max_concurrency=1, max_queue=1, queue_timeout_s=0.5,
                      retry_after_s=7, max_body_bytes=1000)
    async with trio.open_nursery() as nursery:
        rport = await nursery.start(slow_replica, 1.5)
        act = StaticActuator(Endpoint("r", "127.0.0.1", rport))
        run = await nursery.start(run_proxy, cfg, ConcurrencyPolicy(PolicyConfig(min_replicas=1)), act)
        results: dict[str, _http.Message] = {}

        async def send(name: str, after: float) -> None:
            await trio.sleep(after)
            results[name] = await _post(run.port, name.encode())

        with trio.fail_after(10):
            async with trio.open_nursery() as clients:
                clients.start_soon(send, "first", 0)     # in flight 1.5 s
                clients.start_soon(send, "second", 0.1)  # queued, deadline 0.5 s
                clients.start_soon(send, "third", 0.2)   # queue full
        assert results["first"].status == 200 and results["first"].body == b"done:first"
        for name in ("second", "third"):
            assert results[name].status == 503
            assert (b"retry-after", b"7") in results[name].headers
        s = run.dispatcher.statistics()
        assert (s.served, s.rejected_timeout, s.rejected_full) == (1, 1, 1)
        big = await _post(run.port, b"x" * 2000)
        assert big.status == 413
        m = await _http.get("127.0.0.1", run.port, "/metrics", timeout=5)
        assert dict(m.headers)[b"content-type"].startswith(b"text/plain; version=")
        got = samples(m.body.decode())
        assert got[("scaler_requests_total", frozenset({("outcome", "rejected_queue_full")}))] == 1
        assert got[("scaler_client_errors_total", frozenset({("status", "413")}))] == 1
        nursery.cancel_scope.cancel()
