"""The default policy: exact decisions for steady load, bursts (forecast, no cancel while
the queue grows), burst headroom, keep-alive and scale to zero, flapping, rates, standby."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler import ConcurrencyPolicy, ConfigError, Fleet, PolicyConfig, Sample
from scaler._policy import Lead
from scaler._window import WindowAverage, WindowMax, WindowRatio

# Target 10 with 20 slots a replica (capacity 20 x ready): round numbers, 2x slack. No
# base headroom, so each rule shows alone (the base headroom has its own test).
CFG = PolicyConfig(target_concurrency=10, stable_window_s=60, panic_window_s=6, tick_s=1,
                   sample_s=1, max_replicas=100, cold_start_s=60, base_headroom=0)
_r = dataclasses.replace


def feed(p: ConcurrencyPolicy, start: int, end: int, value: float, ready: int = 1,
         **extra: float) -> None:
    """One sample per second for t in [start, end], no queue unless given."""
    for t in range(start, end + 1):
        p.record(t, Sample(concurrency=value, capacity=20 * ready, **extra))


def test_steady_load_gives_ceil_demand_over_target():
    p = ConcurrencyPolicy(CFG)
    feed(p, 1, 60, 20, ready=2)
    d = p.decide(60, Fleet(ready=2))
    assert (d.serving, d.standby, d.mode) == (2, 0, "stable")
    feed(p, 61, 120, 21, ready=2)
    assert p.decide(120, Fleet(ready=2)).serving == 3


def test_the_queue_wait_is_not_demand():
    p = ConcurrencyPolicy(CFG)
    p.record(0, Sample(concurrency=1, service_s=0.5, completed=10))
    s = Sample(concurrency=108, queued=100, arrival_rate=40)
    # In flight 8, arriving work 40 x 0.5 = 20: the 88 beyond it are waiting, not demand.
    assert p.demand(1, s) == pytest.approx(20)
    assert p.demand(1, Sample(concurrency=7, arrival_rate=40)) == 7  # no queue: as measured
    assert ConcurrencyPolicy(CFG).demand(1, s) == 108  # no service time known yet


def test_service_time_is_the_mean_over_completed_requests():
    p = ConcurrencyPolicy(CFG)
    p.record(1, Sample(concurrency=1, service_s=10.0, completed=1))
    p.record(2, Sample(concurrency=1, service_s=1.0, completed=9))
    assert p.service_s(2) == pytest.approx((10 + 9) / 10)  # not (10 + 1) / 2
    assert p.service_s(500) == pytest.approx(1.9)  # an idle spell keeps the last mean


def _overloaded(p: ConcurrencyPolicy, t: float, rate: float, queued: float) -> None:
    # One replica's 20 slots are full; the rest waits.
    p.record(t, Sample(concurrency=20 + queued, queued=queued, capacity=20,
                       arrival_rate=rate, service_s=0.5, completed=40))


def test_a_burst_orders_for_the_backlog_the_new_replicas_will_find():
    cfg = _r(CFG, backlog_drain_s=30, rate_window_s=2)
    p = ConcurrencyPolicy(cfg)
    feed(p, 1, 60, 5)
    assert p.decide(60, Fleet(ready=1)).serving == 1
    _overloaded(p, 61, rate=80, queued=10)
    _overloaded(p, 62, rate=80, queued=60)
    d = p.decide(62, Fleet(ready=1))
    # 20 slots finish 40 req/s; 80 arrive. Over the 60 s lead the backlog reaches
    # 60 + 40 x 60 = 2460: serve 80 x 0.5 / 10 = 4 replicas' worth and drain 2460 x 0.5
    # slot-seconds in 30 s with 20 slots a replica (2.05): 7 replicas, in one order.
    assert (d.serving, d.mode) == (7, "burst")
    need, growing = p.burst_need(62, Fleet(ready=1, starting=6))
    assert growing


def test_orders_stand_while_the_queue_grows_and_go_once_it_drains_in_time():
    p = ConcurrencyPolicy(_r(CFG, backlog_drain_s=30, rate_window_s=2, burst_headroom=0))
    feed(p, 1, 60, 5)
    p.decide(60, Fleet(ready=1))
    _overloaded(p, 61, rate=80, queued=10)
    _overloaded(p, 62, rate=80, queued=60)
    assert p.decide(62, Fleet(ready=1)).serving == 7
    # The rate dips for a moment but still outruns the ready slots: nothing is cancelled.
    _overloaded(p, 63, rate=44, queued=100)
    _overloaded(p, 64, rate=44, queued=104)
    assert p.decide(64, Fleet(ready=1, starting=6)).serving == 7
    # The burst is over: 10 req/s against 40 served, 30 queued drain in one second, long
    # before the starting replicas (ordered 2 s ago, 58 s to go) could help. They go once
    # the want has been lower for order_hold_s (6 s), not on the first quiet sample.
    _overloaded(p, 65, rate=10, queued=40)
    _overloaded(p, 66, rate=10, queued=30)
    assert p.decide(66, Fleet(ready=1, starting=6)).serving == 7
    for t in range(67, 71):
        p.record(t, Sample(concurrency=5, capacity=20, arrival_rate=10, service_s=0.5,
                           completed=10))
        p.decide(t, Fleet(ready=1, starting=6))
    assert p.decide(70, Fleet(ready=1, starting=6)).serving < 7


def test_a_panic_holds_for_a_panic_window_so_orders_do_not_churn():
    p = ConcurrencyPolicy(_r(CFG, backlog_drain_s=None))
    feed(p, 1, 60, 10)
    p.decide(60, Fleet(ready=1))
    feed(p, 61, 66, 50)
    assert (p.decide(66, Fleet(ready=1)).serving, p.mode) == (5, "panic")
    feed(p, 67, 72, 0)  # gone a second later: the replicas asked for stay asked for...
    assert [p.decide(t, Fleet(ready=1, starting=4)).serving for t in (67, 69, 71)] == [5] * 3
    d = p.decide(72.5, Fleet(ready=1, starting=4))  # ...until a panic window has passed
    assert d.serving < 5 and d.mode == "stable"


def test_the_lead_is_learned_from_the_fleet():
    lead = Lead(60.0)
    assert lead.remaining(0) is None
    lead.ordered(0.0, 2)
    assert lead.remaining(10.0) == 50.0
    lead.arrived(45.0, 1)
    assert lead.seconds == 45.0  # the first measurement replaces the prior
    lead.cancelled(1)
    assert lead.remaining(50.0) is None
    p = ConcurrencyPolicy(CFG)
    feed(p, 1, 10, 5)
    p.decide(10, Fleet(ready=1))
    feed(p, 11, 16, 45)  # 5 wanted on the 6 s window: panic, 2 x 1 ready crossed
    d = p.decide(16, Fleet(ready=1))
    assert d.serving >= 3
    p.decide(100, Fleet(ready=d.serving))
    assert p.lead.seconds == pytest.approx(84.0)


def test_headroom_after_a_burst_holds_slots_for_its_height_then_decays():
    cfg = _r(CFG, backlog_drain_s=30, rate_window_s=2, burst_headroom=3, burst_memory_s=600)
    p = ConcurrencyPolicy(cfg)
    feed(p, 1, 60, 10)  # demand 10: one replica at target 10
    assert p.decide(60, Fleet(ready=1)).mode == "stable"
    _overloaded(p, 61, rate=200, queued=50)  # demand 200 x 0.5 = 100: ten times the load
    _overloaded(p, 62, rate=200, queued=150)
    assert p.decide(62, Fleet(ready=1)).mode == "burst"

    def settle(p: ConcurrencyPolicy, start: int, end: int, ready: int) -> object:
        """The burst served, load back to 10; the fleet follows each decision."""
        d = None
        for t in range(start, end + 1):
            feed(p, t, t, 10, ready=ready)
            d = p.decide(t, Fleet(ready=ready))
            ready = d.serving
        return d

    d = settle(p, 63, 400, ready=12)
    # Height 10, capped at 3: slots for 3 x 10 = 30 at 20 a replica -> 2, not 1.
    assert (d.serving, d.mode) == (2, "headroom")
    assert settle(p, 401, 700, ready=2).serving == 1  # 600 s without a burst: forgotten
    off = ConcurrencyPolicy(_r(cfg, burst_headroom=0))
    feed(off, 1, 60, 10)
    off.decide(60, Fleet(ready=1))
    _overloaded(off, 61, rate=200, queued=50)
    _overloaded(off, 62, rate=200, queued=150)
    off.decide(62, Fleet(ready=1))
    assert settle(off, 63, 400, ready=12).serving == 1


def _settle(p: ConcurrencyPolicy, start: int, end: int, ready: int, demand: float = 10):
    """Load back to `demand`; the fleet follows each decision at once."""
    d = None
    for t in range(start, end + 1):
        feed(p, t, t, demand, ready=ready)
        d = p.decide(t, Fleet(ready=ready))
        ready = d.serving
    return d


@pytest.mark.parametrize("rate, want", [(40, 1), (80, 2), (120, 3), (200, 3), (400, 3)])
def test_headroom_follows_the_burst_height_up_to_the_cap(rate, want):
    # Demand 10 before the burst; a burst of rate x 0.5 s is rate / 20 times it. Slots
    # for height x 10 (cap 6) at 20 a replica: height 2 -> 1, 4 -> 2, 6 -> 3, 10 -> 3.
    p = ConcurrencyPolicy(_r(CFG, burst_headroom=6, burst_memory_s=600))
    feed(p, 1, 60, 10)
    p.decide(60, Fleet(ready=1))
    _overloaded(p, 61, rate=rate, queued=30)
    _overloaded(p, 62, rate=rate, queued=60)
    assert p.decide(62, Fleet(ready=1)).mode == "burst"
    d = _settle(p, 63, 300, ready=p.decide(62, Fleet(ready=1)).serving)
    assert d.serving == want


def test_base_headroom_keeps_slack_before_any_burst():
    # Demand 20 at target 10: 2 replicas; base headroom 2.8 keeps slots for 56 -> 3.
    p = ConcurrencyPolicy(_r(CFG, base_headroom=2.8))
    feed(p, 1, 60, 20, ready=2)
    assert (p.decide(60, Fleet(ready=2)).serving, p.mode) == (3, "headroom")
    # Never more than the burst cap, whatever the base says.
    capped = ConcurrencyPolicy(_r(CFG, base_headroom=5, burst_headroom=2))
    feed(capped, 1, 60, 20, ready=2)
    assert capped.decide(60, Fleet(ready=2)).serving == 2
    off = ConcurrencyPolicy(CFG)  # base_headroom 0
    feed(off, 1, 60, 20, ready=2)
    assert (off.decide(60, Fleet(ready=2)).serving, off.mode) == (2, "stable")


def _noisy_overload(hold: float) -> list[int]:
    """One ready replica (40 req/s served) under an arrival rate that crosses it and
    back: 48 req/s with a queue every third second, 36 with one request queued else."""
    p = ConcurrencyPolicy(_r(CFG, order_hold_s=hold, backlog_drain_s=30, rate_window_s=1))
    feed(p, 1, 60, 5)
    p.decide(60, Fleet(ready=1))
    out, starting = [], 0
    for t in range(61, 75):
        rate, queued = (48, 10) if t % 3 == 0 else (36, 1)
        _overloaded(p, t, rate=rate, queued=queued)
        serving = p.decide(t, Fleet(ready=1, starting=starting)).serving
        starting = serving - 1
        out.append(serving)
    return out


def test_orders_do_not_flip_flop_within_the_hold():
    held = _noisy_overload(6)
    # Once ordered, the replicas stand: no cancel and re-place on the noise.
    assert max(held) > 1
    assert all(b >= a for a, b in zip(held, held[1:]))
    # Without the hold the same input cancels an order and places it again, which
    # restarts its cold start (what the hold is for).
    bare = _noisy_overload(0)
    assert any(b < a for a, b in zip(bare, bare[1:]))
    assert any(b > a for a, b in zip(bare[bare.index(max(bare)):], bare[bare.index(max(bare)) + 1:]))


def test_starting_replicas_are_not_kept_for_a_burst_that_is_over():
    def after_burst(hold: float) -> int:
        p = ConcurrencyPolicy(_r(CFG, order_hold_s=hold, burst_headroom=0))
        feed(p, 1, 60, 5)
        p.decide(60, Fleet(ready=1))
        for t in range(61, 81):  # 20 s at 200 req/s x 0.5 s: ten times the slots
            _overloaded(p, t, rate=200, queued=50 * (t - 60))
            p.decide(t, Fleet(ready=1, starting=p.decide(t, Fleet(ready=1)).serving - 1))
        d = None
        for t in range(81, 95):  # over: back to 5, the queue gone
            feed(p, t, t, 5)
            d = p.decide(t, Fleet(ready=1, starting=9))
        return d.serving

    # The stable window still averages the burst in (a third of its minute at 100):
    # kept for it, the nine starting replicas would arrive to serve nothing.
    assert after_burst(0) >= 4
    assert after_burst(6) == 1


def test_keepalive_grows_with_the_arrival_rate_then_zero():
    def idle_after(rate: float, wait_cost: float = 1.0) -> float:
        """Seconds after the last request at which the last replica goes."""
        p = ConcurrencyPolicy(_r(CFG, wait_cost=wait_cost))
        n = int(rate * 60)
        for t in range(1, 61):
            p.record(t, Sample(concurrency=1, arrival_rate=1.0 if t <= n else 0.0,
                               capacity=20))
        for t in range(61, 10_000):
            p.record(t, Sample(concurrency=0, capacity=20))
            if p.decide(t, Fleet(ready=1)).serving == 0:
                return t - 60
        return float("inf")

    # Lead 60 s (the prior). At 0.1 req/s a wake-up costs 60 + 0.1 x 60 x 60 / 2 = 240
    # replica-seconds; at 0.5 req/s, 960: the replica stays that long after the last one.
    assert idle_after(0.1) == 240
    assert idle_after(0.5) == 960
    # No keep-alive: the window holds load until t=119, then 30 s of grace.
    assert idle_after(0.5, wait_cost=0) == 89


def test_first_request_at_zero_activates():
    p = ConcurrencyPolicy(_r(CFG, standby=2))
    d = p.decide(0, Fleet())
    assert (d.serving, d.standby) == (0, 0)  # nothing serving, nothing warm
    p.record(1, Sample(concurrency=3, queued=3))
    d = p.decide(1, Fleet())
    # Activation is not a scale step: no burst seen yet, so nothing is kept warm.
    assert (d.serving, d.standby, d.mode) == (1, 0, "activate")


def test_flapping_input_does_not_flap_the_decision():
    p = ConcurrencyPolicy(CFG)
    out = set()
    for t in range(1, 241):
        p.record(t, Sample(concurrency=5 if t % 2 else 25, capacity=40))
        if t % 2 == 0 and t >= 60:
            out.add(p.decide(t, Fleet(ready=2)).serving)
    assert out == {2}


def test_scale_down_rate_and_delay():
    p = ConcurrencyPolicy(_r(CFG, scale_down_delay_s=10))
    feed(p, 1, 60, 80, ready=8)
    assert p.decide(60, Fleet(ready=8)).serving == 8
    feed(p, 61, 200, 0, ready=8)
    # floor(8/2) = 4 would be allowed, but the delay window still holds the 8 from t=60
    d = p.decide(66, Fleet(ready=8))
    assert (d.serving, d.mode) == (8, "delay")
    assert p.decide(200, Fleet(ready=8)).serving == 4  # rate limit: halve at most


def test_min_and_max_clamp():
    p = ConcurrencyPolicy(_r(CFG, min_replicas=2, max_replicas=3))
    feed(p, 1, 60, 1000, ready=3)
    assert p.decide(60, Fleet(ready=3)).serving == 3
    assert ConcurrencyPolicy(_r(CFG, min_replicas=2)).decide(0, Fleet()).serving == 2


def test_config_is_validated():
    for bad in (dict(target_concurrency=0), dict(panic_window_s=100, stable_window_s=60),
                dict(min_replicas=3, max_replicas=2), dict(standby=1, min_standby=2),
                dict(standby_decay_s=0), dict(backlog_drain_s=0), dict(burst_headroom=-1),
                dict(wait_cost=-1), dict(cold_start_s=0), dict(rate_window_s=0)):
        with pytest.raises(ConfigError):
            PolicyConfig(**bad)


def test_windows():
    w = WindowAverage(3)
    for t, v in [(1, 3), (2, 6), (3, 9), (4, 0)]:
        w.record(t, v)
    assert w.average(4) == 5.0 and w.total(4) == 15.0  # (6 + 9 + 0) / 3
    assert w.average(100) == 0.0
    m = WindowMax(3)
    for t, v in [(1, 5), (2, 1), (3, 2)]:
        m.record(t, v)
    assert m.current(3) == 5 and m.current(4) == 2 and m.current(10, 7) == 7
    r = WindowRatio(3)
    r.record(1, 10, 1)
    r.record(2, 9, 9)
    assert r.value(2) == pytest.approx(1.9) and r.value(4) == pytest.approx(1.0)
    assert r.value(100) == pytest.approx(1.0)  # empty: the last mean


# Standby (off by default) follows the scale step, as before the redesign.
SB = _r(CFG, standby=2, standby_decay_s=300, backlog_drain_s=None, burst_headroom=0)


def burst(cfg: PolicyConfig = SB) -> ConcurrencyPolicy:
    """One replica at concurrency 10, then 50 for 6 s: a step of 4 that outruns its slots."""
    p = ConcurrencyPolicy(cfg)
    feed(p, 1, 60, 10)
    d = p.decide(60, Fleet(ready=1))
    assert (d.serving, d.standby) == (1, cfg.min_standby)  # no step yet: only the floor
    feed(p, 61, 66, 50)
    return p


def test_a_burst_grows_standby_to_its_step_capped_at_the_maximum():
    p = burst()
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.standby, d.mode) == (5, 2, "panic")
    assert p.standby_step(66) == 4  # 5 wanted - 1 ready; the cap makes it 2
    assert burst(_r(SB, standby=8)).decide(66, Fleet(ready=1)).standby == 4
    assert burst(_r(SB, standby=0)).decide(66, Fleet(ready=1)).standby == 0


def test_a_step_the_ready_slots_absorb_grows_no_standby():
    p = ConcurrencyPolicy(SB)
    feed(p, 1, 60, 10)
    p.decide(60, Fleet(ready=1))
    feed(p, 61, 66, 19)  # panic (2 wanted, 1 ready), but 19 < 20 slots
    d = p.decide(66, Fleet(ready=1))
    assert (d.serving, d.standby, d.mode) == (2, 0, "panic")
    assert p.standby_step(66) == 0


def test_a_quiet_period_shrinks_standby_after_the_decay():
    p = burst()
    assert p.decide(66, Fleet(ready=1)).standby == 2
    feed(p, 67, 400, 30, ready=5)  # served, no further step
    assert p.decide(364, Fleet(ready=5)).standby == 2  # the step at 66 is 298 s old
    d = p.decide(366, Fleet(ready=5))
    assert (d.serving, d.standby) == (3, 0)  # 300 s: forgotten
    floor = burst(_r(SB, min_standby=1))
    floor.decide(66, Fleet(ready=1))
    feed(floor, 67, 400, 30, ready=5)
    assert floor.decide(366, Fleet(ready=5)).standby == 1


def test_scale_to_zero_keeps_only_the_standby_floor():
    for floor in (0, 1):
        p = burst(_r(SB, min_standby=floor, wait_cost=0))
        prev = p.decide(66, Fleet(ready=1))
        got = {}
        for t in range(67, 301):
            p.record(t, Sample(concurrency=0, capacity=20 * prev.serving))
            if t % 2 == 0:
                prev = got[t] = p.decide(t, Fleet(ready=prev.serving))
        zero = min(t for t, d in got.items() if d.serving == 0)
        # The window empties at t=126 (last load at 66), halving gets to 1 by then; grace
        # 30 s after the last non-zero decision (124): zero at 154, only the floor warm.
        assert zero == 154 and got[152].mode == "grace"
        assert all(got[t].standby == floor for t in got if t >= zero)
        p.record(301, Sample(concurrency=1, queued=1))
        d = p.decide(301, Fleet())
        assert (d.serving, d.standby, d.mode) == (1, 2, "activate")  # the step is remembered


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=500),
                          st.floats(min_value=0, max_value=400),
                          st.floats(min_value=0, max_value=100)), min_size=1, max_size=150),
       st.integers(min_value=0, max_value=50), st.integers(min_value=0, max_value=20))
def test_decisions_stay_in_bounds_and_rates(values, ready, starting):
    cfg = PolicyConfig(target_concurrency=4, max_replicas=40, min_replicas=0, standby=2)
    p = ConcurrencyPolicy(cfg)
    for t, (conc, queued, rate) in enumerate(values, 1):
        queued = min(queued, conc)
        p.record(t, Sample(concurrency=conc, queued=queued, arrival_rate=rate,
                           capacity=8 * ready, service_s=0.5, completed=rate))
        d = p.decide(t, Fleet(ready=ready, starting=starting))
        assert 0 <= d.serving <= 40
        assert cfg.min_standby <= d.standby <= cfg.standby
        if d.mode == "stable" and d.serving < ready:
            assert d.serving >= ready // 2  # max scale-down rate 2
        if d.serving == 0:
            assert d.mode in ("stable",) and d.standby == 0
