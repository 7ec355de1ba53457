"""End to end: real replica processes behind the real proxy, under a bounded loopback
burst. It scales up during the burst, back to zero after the grace period, and every
request gets its answer. Also: a replica that dies mid-request is retried elsewhere."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from scaler import LocalActuator, LocalConfig, PolicyConfig, ProxyConfig, ConcurrencyPolicy, run_proxy
from scaler import _http

from scaler_helpers import replica_cmd

POLICY = PolicyConfig(target_concurrency=2, stable_window_s=3, panic_window_s=1, tick_s=0.25,
                      sample_s=0.25, scale_to_zero_grace_s=1.5, min_replicas=0, max_replicas=4)
PROXY = ProxyConfig(port=0, max_concurrency=2, queue_timeout_s=30, max_queue=500)


def _local(**kw) -> LocalActuator:
    return LocalActuator(LocalConfig(probe_interval_s=0.05, stop_timeout_s=3, drain_timeout_s=5,
                                     start_timeout_s=20, **kw))


def _kill_leftovers(act: LocalActuator) -> None:
    # The actuator stops its replicas on cancel; this only guards against a bug there.
    for pid in act.pids():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def _burst(port: int, n: int, clients: int) -> list[int]:
    statuses: list[int] = []
    jobs = iter(range(n))

    async def client() -> None:
        for _ in jobs:
            r = await _http.get("127.0.0.1", port, "/work", timeout=30)
            statuses.append(r.status)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return statuses


@pytest.mark.trio
async def test_burst_scales_up_then_to_zero_and_loses_nothing():
    act = _local(replica_cmd=replica_cmd(delay=0.08))
    try:
        async with trio.open_nursery() as nursery:
            run = await nursery.start(run_proxy, PROXY, ConcurrencyPolicy(POLICY), act)
            assert act.fleet().serving == 0  # min 0: nothing runs before traffic
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, act.fleet().ready)
                    await trio.sleep(0.05)

            nursery.start_soon(watch)
            with trio.fail_after(60):
                statuses = await _burst(run.port, n=240, clients=16)
            assert statuses == [200] * 240  # nothing lost, nothing rejected
            assert peak >= 3, f"did not scale up (peak {peak})"
            with trio.fail_after(20):
                while act.fleet().serving or act.pids():
                    await trio.sleep(0.1)
            s = run.dispatcher.statistics()
            assert (s.served, s.rejected_full, s.rejected_timeout, s.failed) == (240, 0, 0, 0)
            metrics = (await _http.get("127.0.0.1", run.port, "/metrics", timeout=5)).body.decode()
            got = {(s.name, tuple(s.labels.items())): s.value
                   for f in text_string_to_metric_families(metrics) for s in f.samples}
            assert got[("scaler_requests_total", (("outcome", "served"),))] == 240
            assert got[("scaler_concurrency", ())] == 0
            modes = [d.mode for _, d in run.controller.decisions]
            assert modes[0] == "activate" and run.controller.decisions[-1][1].serving == 0
            nursery.cancel_scope.cancel()
    finally:
        _kill_leftovers(act)


@pytest.mark.trio
async def test_replica_dying_before_answering_is_retried_elsewhere(tmp_path):
    flag = tmp_path / "die"
    act = _local(replica_cmd=replica_cmd(delay=0.05, die_flag=flag))
    policy = PolicyConfig(**{**POLICY.__dict__, "min_replicas": 2, "scale_to_zero_grace_s": 60})
    try:
        async with trio.open_nursery() as nursery:
            run = await nursery.start(run_proxy, PROXY, ConcurrencyPolicy(policy), act)
            with trio.fail_after(20):
                while act.fleet().ready < 2:
                    await trio.sleep(0.05)
            flag.write_text("x")
            with trio.fail_after(30):
                statuses = await _burst(run.port, n=20, clients=4)
            assert statuses == [200] * 20
            s = run.dispatcher.statistics()
            # Every request in flight at the dying replica (one or two) went elsewhere.
            assert 1 <= s.retries <= PROXY.max_concurrency and s.failed == 0
            assert act.failed >= 1
            with trio.fail_after(20):  # the dead one is replaced
                while act.fleet().ready < 2:
                    await trio.sleep(0.05)
            # Two, plus the replacement; the burst may also scale up by one on a loaded
            # machine (its requests take longer there), never more.
            assert 3 <= act.started <= 4
            nursery.cancel_scope.cancel()
    finally:
        _kill_leftovers(act)
    assert not act.pids()
