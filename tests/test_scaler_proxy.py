"""The queue proxy's core (Dispatcher) exactly, then the proxy over loopback with an
in-process replica: queue bound and deadline answer 503 + Retry-After, bodies are
bounded, /metrics shows the signal."""

from __future__ import annotations

import h11
import pytest
import trio

from scaler import ConcurrencyPolicy, Dispatcher, Endpoint, Fleet, PolicyConfig, ProxyConfig, run_proxy
from scaler import _http, _metrics
from scaler._dispatch import QueueFull

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


def test_metrics_render_parse_roundtrip():
    snap = _metrics.Snapshot(in_flight=3, queued=4, ready=2, starting=1, standby=2, desired=3,
                             stable_concurrency=5.5, panic_concurrency=7.25, panicking=True,
                             accepted=10, served=6, rejected_full=1, rejected_timeout=2,
                             failed=0, retries=1, queue_delay_sum_s=1.5, queue_delay_count=6)
    text = _metrics.render(snap)
    assert _metrics.value(text, "scaler_concurrency") == 7
    assert _metrics.value(text, "scaler_concurrency_average", {"window": "panic"}) == 7.25
    assert _metrics.value(text, "scaler_replicas", {"state": "standby"}) == 2
    assert _metrics.value(text, "scaler_queue_delay_seconds_count") == 6


# ----------------------------------------------------------------------------- over loopback

class StaticActuator:
    """A test double at the actuator interface: one fixed endpoint, always there."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep

    async def run(self, hooks, *, task_status=trio.TASK_STATUS_IGNORED):
        hooks.ready(self.ep)
        task_status.started()
        await trio.sleep_forever()

    def set_target(self, serving, standby):
        pass

    def fleet(self):
        return Fleet(ready=1)

    def endpoint_failed(self, ep_id):
        pass


async def slow_replica(delay: float, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream):
        conn = h11.Connection(h11.SERVER)
        req = await _http.read_request(conn, stream, max_body=1 << 20)
        await trio.sleep(delay)
        await _http.write_response(conn, stream, 200, [], b"done:" + req.body)

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
        assert _metrics.value(m.body.decode(), "scaler_requests_total",
                              {"outcome": "rejected_queue_full"}) == 1
        nursery.cancel_scope.cancel()
