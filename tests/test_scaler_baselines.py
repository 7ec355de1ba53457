"""The anchors' policies: the KPA's target factor, panic and windows, HPA's capped metric
and stabilization, Ray Serve's decision delays. Exact decisions from their documented
algorithms."""

from __future__ import annotations

from scaler import (Fleet, HpaConfig, HpaPolicy, KpaConfig, RayServeConfig, RayServePolicy,
                    Sample, kpa_policy, make_policy)

# Target 10 exactly (no 70% factor) so the KPA's decisions are round numbers.
KPA10 = KpaConfig(target=10, target_utilization=1.0, max_replicas=100)


def _feed(p, start: int, end: int, value: float) -> None:
    """One sample per second for t in [start, end]."""
    for t in range(start, end + 1):
        p.record(t, Sample(concurrency=value))


def test_kpa_aims_at_70_percent_of_the_target():
    p = kpa_policy(KpaConfig(target=10))
    for t in range(1, 61):
        p.record(t, Sample(concurrency=14))
    assert p.decide(60, Fleet(ready=2)).serving == 2  # 14 / 7
    for t in range(61, 121):
        p.record(t, Sample(concurrency=15))
    assert p.decide(120, Fleet(ready=2)).serving == 3  # 15 / 7 -> 3; 10 would give 2


def test_kpa_panics_in_one_step_and_never_scales_down_while_panicking():
    p = kpa_policy(KPA10)
    _feed(p, 1, 60, 10)
    assert p.decide(60, Fleet(ready=1)).serving == 1
    _feed(p, 61, 66, 50)
    # stable = (54*10 + 6*50)/60 = 14 -> 2; panic = 50 -> 5 >= 2 x 1 ready: panic.
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.mode) == (5, "panic") and p.panicking
    _feed(p, 67, 72, 0)
    d = p.decide(72, Fleet(ready=5))
    assert (d.serving, d.mode) == (5, "panic")  # load gone, but the burst was 6 s ago
    _feed(p, 73, 127, 0)
    # 61 s after the last over-threshold tick: back to stable; rate limit floor(5/2)=2.
    d = p.decide(127, Fleet(ready=5))
    assert (d.serving, d.mode) == (2, "stable")
    assert p.decide(129, Fleet(ready=2)).serving == 1


def test_kpa_ramp_follows_the_stable_window():
    p = kpa_policy(KPA10)
    got = []
    for t in range(1, 121):
        p.record(t, Sample(concurrency=t / 2))  # 0.5 .. 60, a slow ramp
        if t % 20 == 0:
            got.append(p.decide(t, Fleet(ready=max(1, got[-1] if got else 1))).serving)
    # t=40: the panic window (18.75 -> 2) is twice the one ready replica: panic, which
    # takes max(stable, panic) until 60 s after; t=120: stable 45.25 -> 5.
    assert got == [1, 2, 3, 4, 5, 5]


def test_kpa_idles_to_zero_after_the_grace_period():
    p = kpa_policy(KPA10)
    _feed(p, 1, 10, 4)
    assert p.decide(10, Fleet(ready=1)).serving == 1
    decisions = {}
    for t in range(11, 101):
        p.record(t, Sample(concurrency=0))
        if t % 2 == 0:
            decisions[t] = p.decide(t, Fleet(ready=1)).serving
    # The window holds a non-zero sample until t=70; the last non-zero decision is at 68;
    # grace 30 s: zero from t=98.
    assert all(decisions[t] == 1 for t in range(12, 97, 2))
    assert decisions[98] == 0 and decisions[100] == 0


def test_kpa_counts_queued_requests_and_its_scale_down_delay():
    p = kpa_policy(KpaConfig(target=10, target_utilization=1.0, scale_down_delay_s=10))
    p.record(1, Sample(concurrency=108, queued=100))
    assert p.decide(1, Fleet(ready=1)).serving == 11  # every queued request counts
    q = kpa_policy(KpaConfig(target=10, target_utilization=1.0, scale_down_delay_s=10,
                             max_replicas=100))
    _feed(q, 1, 60, 80)
    assert q.decide(60, Fleet(ready=8)).serving == 8
    _feed(q, 61, 200, 0)
    d = q.decide(66, Fleet(ready=8))  # floor(8/2) allowed, but the delay holds the 8
    assert (d.serving, d.mode) == (8, "delay")
    assert q.decide(200, Fleet(ready=8)).serving == 4  # rate limit: halve at most


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
