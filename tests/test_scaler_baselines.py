"""The anchors' policies: KPA target factor, HPA's capped metric and stabilization,
Ray Serve's decision delays. Exact decisions from their documented algorithms."""

from __future__ import annotations

from scaler import (Fleet, HpaConfig, HpaPolicy, KpaConfig, RayServeConfig, RayServePolicy,
                    Sample, kpa_policy, make_policy)


def test_kpa_aims_at_70_percent_of_the_target():
    p = kpa_policy(KpaConfig(target=10))
    for t in range(1, 61):
        p.record(t, Sample(concurrency=14))
    assert p.decide(60, Fleet(ready=2)).serving == 2  # 14 / 7
    for t in range(61, 121):
        p.record(t, Sample(concurrency=15))
    assert p.decide(120, Fleet(ready=2)).serving == 3  # 15 / 7 -> 3; 10 would give 2


def _hpa_feed(p: HpaPolicy, start: int, end: int, busy: float, capacity: float) -> None:
    for t in range(start, end + 1):
        p.record(t, Sample(concurrency=0, busy=busy, capacity=capacity))


def test_hpa_metric_is_capped_and_unready_pods_hold_scale_up():
    p = HpaPolicy(HpaConfig(target_utilization=0.5))
    _hpa_feed(p, 1, 15, busy=16, capacity=16)  # 2 ready, 100% busy, however long the queue
    d = p.decide(15, Fleet(ready=2))
    assert d.serving == 4  # ratio 2 -> ceil(2 * 2); limit max(2 x 2, 2 + 4) = 6
    _hpa_feed(p, 16, 30, busy=16, capacity=16)
    # 2 ready at 100% + 2 starting counted at 0%: ratio 1.0, inside the tolerance.
    assert p.decide(30, Fleet(ready=2, starting=2)).serving == 4


def test_hpa_scale_up_rate_is_max_of_100_percent_or_4_pods():
    p = HpaPolicy(HpaConfig(target_utilization=0.1))
    _hpa_feed(p, 1, 15, busy=8, capacity=8)
    assert p.decide(15, Fleet(ready=1)).serving == 5  # wants 10; 1 + 4 pods beats 100%


def test_hpa_scale_down_waits_for_the_stabilization_window():
    p = HpaPolicy(HpaConfig(target_utilization=0.5))
    _hpa_feed(p, 1, 15, busy=16, capacity=16)
    assert p.decide(15, Fleet(ready=2)).serving == 4
    t = 15
    out = []
    while t < 330:
        t += 15
        _hpa_feed(p, t - 14, t, busy=1, capacity=32)
        out.append((t, p.decide(t, Fleet(ready=4)).serving))
    held = [n for tt, n in out if tt < 15 + 300]
    assert set(held) == {4}
    assert out[-1][1] == 1  # min replicas


def test_hpa_tolerance():
    p = HpaPolicy(HpaConfig(target_utilization=0.5))
    _hpa_feed(p, 1, 15, busy=8.6, capacity=16)  # 53.75%: ratio 1.075 <= 1.1
    assert p.decide(15, Fleet(ready=2)).serving == 2


def test_rayserve_upscale_needs_30_s_of_consecutive_decisions():
    p = RayServePolicy(RayServeConfig(target_ongoing_requests=2))
    p.record(0, Sample(concurrency=8))  # pushed: 8 ongoing -> 4 replicas wanted
    fleet = Fleet(ready=1)
    decisions = [p.decide(i * 0.1, fleet).serving for i in range(302)]
    assert decisions[0] == 1 and decisions[299] == 1
    assert decisions[300] == 4  # counter 301 > int(30 / 0.1)
    assert decisions[301] == 4


def test_rayserve_cold_start_fast_path_and_min_one():
    p = RayServePolicy(RayServeConfig(min_replicas=0, downscale_to_zero_delay_s=0.5))
    assert p.decide(0, Fleet()).serving == 0
    p.record(1, Sample(concurrency=1))
    assert p.decide(1, Fleet()).serving == 1  # no delay at zero
    q = RayServePolicy(RayServeConfig())
    q.record(0, Sample(concurrency=0))
    out = [q.decide(i * 0.1, Fleet(ready=3)).serving for i in range(6002)]
    assert out[5999] == 3 and out[-1] == 1  # 600 s later, and never below min_replicas


def test_make_policy_names():
    for name in ("concurrency", "kpa", "hpa", "rayserve"):
        p = make_policy(name, target_concurrency=4, max_concurrency=8)
        assert p.tick_s > 0 and p.sample_s > 0
