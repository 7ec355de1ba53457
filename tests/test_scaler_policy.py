"""The concurrency policy: exact decisions for bursts, ramps, idle to zero, flapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler import ConcurrencyPolicy, ConfigError, Fleet, PolicyConfig, Sample
from scaler._window import WindowAverage, WindowMax

CFG = PolicyConfig(target_concurrency=10, stable_window_s=60, panic_window_s=6, tick_s=2,
                   sample_s=1, max_replicas=100, backlog_drain_s=None)


def feed(p: ConcurrencyPolicy, start: int, end: int, value: float) -> None:
    """One sample per second for t in [start, end]."""
    for t in range(start, end + 1):
        p.record(t, Sample(concurrency=value))


def test_steady_load_gives_ceil_concurrency_over_target():
    p = ConcurrencyPolicy(CFG)
    feed(p, 1, 60, 20)
    d = p.decide(60, Fleet(ready=2))
    assert (d.serving, d.standby, d.mode) == (2, 0, "stable")
    feed(p, 61, 120, 21)
    assert p.decide(120, Fleet(ready=2)).serving == 3


def test_burst_panics_in_one_step_and_never_scales_down_while_panicking():
    p = ConcurrencyPolicy(CFG)
    feed(p, 1, 60, 10)
    assert p.decide(60, Fleet(ready=1)).serving == 1
    feed(p, 61, 66, 50)
    # stable = (54*10 + 6*50)/60 = 14 -> 2; panic = 50 -> 5 >= 2 x 1 ready: panic.
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.mode) == (5, "panic")
    feed(p, 67, 72, 0)
    # Load gone, but the burst was 6 s ago: hold 5.
    d = p.decide(72, Fleet(ready=5))
    assert (d.serving, d.mode) == (5, "panic")
    feed(p, 73, 127, 0)
    # 61 s after the last over-threshold tick: back to stable; rate limit floor(5/2)=2.
    d = p.decide(127, Fleet(ready=5))
    assert (d.serving, d.mode) == (2, "stable")
    assert p.decide(129, Fleet(ready=2)).serving == 1


def test_ramp_follows_the_stable_window():
    p = ConcurrencyPolicy(CFG)
    got = []
    for t in range(1, 121):
        p.record(t, Sample(concurrency=t / 2))  # 0.5 .. 60, a slow ramp
        if t % 20 == 0:
            got.append(p.decide(t, Fleet(ready=max(1, got[-1] if got else 1))).serving)
    # t=20: stable 5.25 -> 1. t=40: the panic window (18.75 -> 2) is twice the one
    # ready replica: panic. t=60..100: panic takes max(stable, panic) = ceil(28.75/10),
    # ceil(38.75/10), ceil(48.75/10). t=120: 80 s after the panic began, stable 45.25 -> 5.
    assert got == [1, 2, 3, 4, 5, 5]


def test_idle_goes_to_zero_after_the_grace_period():
    p = ConcurrencyPolicy(CFG)
    feed(p, 1, 10, 4)
    assert p.decide(10, Fleet(ready=1)).serving == 1
    decisions = {}
    for t in range(11, 101):
        p.record(t, Sample(concurrency=0))
        if t % 2 == 0:
            decisions[t] = p.decide(t, Fleet(ready=1)).serving
    # The window holds a non-zero sample until t=70; the last non-zero decision is at 68;
    # grace 30 s: zero from t=98.
    assert all(decisions[t] == 1 for t in range(12, 97, 2))
    assert p.decide(98, Fleet(ready=1)) .serving == 0
    assert decisions[98] == 0 and decisions[100] == 0


def test_first_request_at_zero_activates_without_standby():
    p = ConcurrencyPolicy(PolicyConfig(**{**CFG.__dict__, "standby": 2}))
    d = p.decide(0, Fleet())
    assert (d.serving, d.standby) == (0, 0)  # nothing serving, nothing warm
    p.record(1, Sample(concurrency=3))
    d = p.decide(1, Fleet())
    # Activation is not a scale step: no burst seen yet, so nothing is kept warm.
    assert (d.serving, d.standby, d.mode) == (1, 0, "activate")


def test_min_standby_keeps_warm_replicas_at_zero():
    p = ConcurrencyPolicy(PolicyConfig(**{**CFG.__dict__, "standby": 1, "min_standby": 1}))
    assert p.decide(0, Fleet()).standby == 1


# Standby follows the scale step. Replicas here have 20 slots (target 10): `capacity`
# is 20 x ready, so concurrency above it means requests wait for the step.
SB = PolicyConfig(**{**CFG.__dict__, "standby": 2, "standby_decay_s": 300})


def feed_slots(p: ConcurrencyPolicy, start: int, end: int, value: float, ready: int) -> None:
    for t in range(start, end + 1):
        p.record(t, Sample(concurrency=value, capacity=20 * ready))


def burst(cfg: PolicyConfig = SB) -> ConcurrencyPolicy:
    """One replica at concurrency 10, then 50 for 6 s: a step of 4 that outruns its slots."""
    p = ConcurrencyPolicy(cfg)
    feed_slots(p, 1, 60, 10, ready=1)
    d = p.decide(60, Fleet(ready=1))
    assert (d.serving, d.standby) == (1, cfg.min_standby)  # no step yet: only the floor
    feed_slots(p, 61, 66, 50, ready=1)
    return p


def test_a_burst_grows_standby_to_its_step_capped_at_the_maximum():
    p = burst()
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.standby, d.mode) == (5, 2, "panic")
    assert p.standby_step(66) == 4  # 5 wanted - 1 ready; the cap makes it 2
    wide = burst(PolicyConfig(**{**SB.__dict__, "standby": 8}))
    assert wide.decide(66, Fleet(ready=1)).standby == 4
    off = burst(PolicyConfig(**{**SB.__dict__, "standby": 0}))
    assert off.decide(66, Fleet(ready=1)).standby == 0


def test_a_step_the_ready_slots_absorb_grows_no_standby():
    p = ConcurrencyPolicy(SB)
    feed_slots(p, 1, 60, 10, ready=1)
    p.decide(60, Fleet(ready=1))
    feed_slots(p, 61, 66, 19, ready=1)  # panic (2 wanted, 1 ready), but 19 < 20 slots
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.standby, d.mode) == (2, 0, "panic")
    assert p.standby_step(66) == 0


def test_a_quiet_period_shrinks_standby_after_the_decay():
    p = burst()
    assert p.decide(66, Fleet(ready=1)).standby == 2
    feed_slots(p, 67, 400, 30, ready=5)  # served, no further step
    assert p.decide(364, Fleet(ready=5)).standby == 2  # the step at 66 is 298 s old
    d = p.decide(366, Fleet(ready=5))
    assert (d.serving, d.standby) == (3, 0)  # 300 s: forgotten
    floor = burst(PolicyConfig(**{**SB.__dict__, "min_standby": 1}))
    floor.decide(66, Fleet(ready=1))
    feed_slots(floor, 67, 400, 30, ready=5)
    assert floor.decide(366, Fleet(ready=5)).standby == 1


def test_scale_to_zero_keeps_no_standby_and_activation_restores_the_step():
    for floor in (0, 1):
        p = burst(PolicyConfig(**{**SB.__dict__, "min_standby": floor}))
        prev = p.decide(66, Fleet(ready=1))
        got = {}
        for t in range(67, 201):
            p.record(t, Sample(concurrency=0, capacity=20 * prev.serving))
            if t % 2 == 0:
                prev = got[t] = p.decide(t, Fleet(ready=prev.serving))
        # Panic holds 5 until t=126; then halve per tick to 1 at 130; the desired count
        # is 0 from 132, grace 30 s after the last non-zero decision (130): zero at 160.
        assert (got[126].serving, got[128].serving, got[130].serving) == (5, 2, 1)
        assert (got[158].serving, got[158].standby, got[158].mode) == (1, 2, "grace")
        assert (got[160].serving, got[160].standby) == (0, floor)
        assert all(got[t].standby == floor for t in range(160, 201, 2))
        # A request within the decay window wakes it with the remembered step's standby.
        p.record(201, Sample(concurrency=1))
        d = p.decide(201, Fleet())
        assert (d.serving, d.standby, d.mode) == (1, 2, "activate")


def test_flapping_input_does_not_flap_the_decision():
    p = ConcurrencyPolicy(CFG)
    out = set()
    for t in range(1, 241):
        p.record(t, Sample(concurrency=5 if t % 2 else 25))
        if t % 2 == 0 and t >= 60:
            out.add(p.decide(t, Fleet(ready=2)).serving)
    assert out == {2}


def test_scale_down_rate_and_delay():
    cfg = PolicyConfig(**{**CFG.__dict__, "scale_down_delay_s": 10})
    p = ConcurrencyPolicy(cfg)
    feed(p, 1, 60, 80)
    assert p.decide(60, Fleet(ready=8)).serving == 8
    feed(p, 61, 200, 0)
    # floor(8/2) = 4 would be allowed, but the delay window still holds the 8 from t=60
    d = p.decide(66, Fleet(ready=8))
    assert (d.serving, d.mode) == (8, "delay")
    assert p.decide(200, Fleet(ready=8)).serving == 4  # rate limit: halve at most


def test_min_and_max_clamp():
    p = ConcurrencyPolicy(PolicyConfig(**{**CFG.__dict__, "min_replicas": 2, "max_replicas": 3}))
    feed(p, 1, 60, 1000)
    assert p.decide(60, Fleet(ready=3)).serving == 3
    p2 = ConcurrencyPolicy(PolicyConfig(**{**CFG.__dict__, "min_replicas": 2}))
    assert p2.decide(0, Fleet()).serving == 2


def test_backlog_is_discounted_only_when_queued():
    p = ConcurrencyPolicy(PolicyConfig(backlog_drain_s=60))
    s = Sample(concurrency=108, queued=100, arrival_rate=40, service_s=0.5)
    # demand 40 x 0.5 = 20 counts; the 88 beyond it count 0.5/60 each.
    assert p.effective_concurrency(s) == pytest.approx(20 + 88 * 0.5 / 60)
    assert p.effective_concurrency(Sample(concurrency=7, arrival_rate=40, service_s=0.5)) == 7
    kpa_like = ConcurrencyPolicy(PolicyConfig(backlog_drain_s=None))
    assert kpa_like.effective_concurrency(s) == 108


def test_config_is_validated():
    with pytest.raises(ConfigError):
        PolicyConfig(target_concurrency=0)
    with pytest.raises(ConfigError):
        PolicyConfig(panic_window_s=100, stable_window_s=60)
    with pytest.raises(ConfigError):
        PolicyConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError):
        PolicyConfig(standby=1, min_standby=2)
    with pytest.raises(ConfigError):
        PolicyConfig(standby_decay_s=0)


def test_windows():
    w = WindowAverage(3)
    for t, v in [(1, 3), (2, 6), (3, 9), (4, 0)]:
        w.record(t, v)
    assert w.average(4) == 5.0  # (6 + 9 + 0) / 3
    assert w.average(100) == 0.0
    m = WindowMax(3)
    for t, v in [(1, 5), (2, 1), (3, 2)]:
        m.record(t, v)
    assert m.current(3) == 5 and m.current(4) == 2 and m.current(10, 7) == 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=500), min_size=1, max_size=150),
       st.integers(min_value=0, max_value=50))
def test_decisions_stay_in_bounds_and_rates(values, ready):
    cfg = PolicyConfig(target_concurrency=4, max_replicas=40, min_replicas=0)
    p = ConcurrencyPolicy(cfg)
    for t, v in enumerate(values, 1):
        p.record(t, Sample(concurrency=v))
        d = p.decide(t, Fleet(ready=ready))
        assert 0 <= d.serving <= 40
        assert cfg.min_standby <= d.standby <= cfg.standby
        if d.mode in ("stable", "panic") and d.serving < ready:
            assert d.serving >= ready // 2  # max scale-down rate 2


def test_a_burst_from_zero_is_seen_after_activation():
    p = ConcurrencyPolicy(SB)
    p.record(1, Sample(concurrency=1))  # the activator's poke: one request
    d = p.decide(1, Fleet())
    assert (d.serving, d.standby, d.mode) == (1, 0, "activate")
    for t in range(2, 5):  # the queue grows while the first replica starts: no slots yet
        p.record(t, Sample(concurrency=40, queued=40))
    d = p.decide(4, Fleet(starting=1))
    # stable (1 + 3 x 40) / 4 = 30.25 -> 4, panic the same: 4 wanted, 0 ready -> step 4.
    assert (d.serving, d.standby, p.standby_step(4)) == (4, 2, 4)
