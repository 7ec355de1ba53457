"""The generated trace family: seeded determinism, the shapes it promises (bursts of their
height, silences, ramps, service laws and their bounds), the family's documented ranges,
and a bounded check of the default policy against KPA and HPA on members never used while
choosing the defaults."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest

from scaler import (PolicyConfig, Shape, SimConfig, TraceError, family, generate, make_policy,
                    simulate)
from scaler._family import SERVICE_LAWS, features, rate_fn

FLAT = Shape(duration_s=3600, base_rps=5, base_swing=0, burst_gap_s=600, burst_height=(8, 8),
             burst_width_s=(120, 120), rise=0, service="gamma", service_mean_s=0.5,
             service_spread=0.5)


def test_same_seed_same_trace_other_seed_other_trace():
    a, b, c = generate(FLAT, 3), generate(FLAT, 3), generate(FLAT, 4)
    assert a == b and a != c
    assert features(FLAT, 3) == features(FLAT, 3)
    assert family(5, seed=1) == family(5, seed=1)
    assert family(5, seed=1) != family(5, seed=2)
    assert family(5, seed=1)[0].trace() == family(5, seed=1)[0].trace()


def test_arrivals_are_sorted_inside_the_trace_and_service_times_bounded():
    for law, spread in (("gamma", 0.8), ("lognormal", 1.2), ("pareto", 1.6)):
        shape = dataclasses.replace(FLAT, service=law, service_spread=spread)
        t = generate(shape, 5)
        assert t.arrivals == sorted(t.arrivals)
        assert 0 <= t.arrivals[0] and t.arrivals[-1] < shape.duration_s
        assert all(0 < s <= shape.service_cap * shape.service_mean_s for s in t.service)


def test_bursts_have_their_height_over_the_base():
    f = features(FLAT, 7)
    assert len(f.bursts) >= 2
    t = generate(FLAT, 7)
    inside = sum(b - a for a, b, _ in f.bursts)
    n_in = sum(any(a <= x < b for a, b, _ in f.bursts) for x in t.arrivals)
    rate_in, rate_out = n_in / inside, (len(t) - n_in) / (FLAT.duration_s - inside)
    assert rate_out == pytest.approx(5, rel=0.1)
    assert rate_in / rate_out == pytest.approx(8, rel=0.1)
    assert all(3 * 1 <= h for *_, h in features(Shape(), 1).bursts)


def test_silences_are_silent_and_ramps_raise_the_base():
    shape = dataclasses.replace(FLAT, burst_gap_s=1e9, silences=2, silence_s=400, ramps=1,
                                ramp_factor=4, ramp_s=300)
    f = features(shape, 2)
    assert len(f.bursts) == 0 and len(f.silences) == 2 and len(f.ramps) == 1
    t = generate(shape, 2)
    assert not any(a <= x < b for a, b in f.silences for x in t.arrivals)
    rate = rate_fn(shape, 2)
    (r0, r1), = f.ramps
    top = r0 + 1.5 * shape.ramp_s  # the middle of the hold
    if not any(a <= top < b for a, b in f.silences):
        assert rate(top) == pytest.approx(4 * 5)
    assert rate(r1 + 1) in (0.0, pytest.approx(5))


def test_service_laws_have_their_mean_and_tails():
    tails = {}
    for law, spread in (("gamma", 0.5), ("lognormal", 1.0), ("pareto", 2.0)):
        shape = dataclasses.replace(FLAT, base_rps=20, burst_gap_s=1e9, service=law,
                                    service_spread=spread, service_cap=1e6)
        s = generate(shape, 11).service
        assert statistics.fmean(s) == pytest.approx(0.5, rel=0.1), law
        tails[law] = sorted(s)[int(0.999 * len(s))] / 0.5
    assert tails["gamma"] < tails["lognormal"] and tails["gamma"] < tails["pareto"]


def test_bad_shapes_are_refused():
    for bad in (dict(base_swing=1), dict(burst_height=(0.5, 2)), dict(burst_width_s=(30, 10)),
                dict(service="weibull"), dict(service="pareto", service_spread=1.0),
                dict(service_cap=1), dict(ramps=-1), dict(duration_s=0)):
        with pytest.raises(TraceError):
            Shape(**bad)


def test_family_members_stay_in_the_documented_ranges():
    members = family(30, seed=3)
    assert [m.shape.service for m in members[:6]] == list(SERVICE_LAWS) * 2
    assert len({m.seed for m in members}) == 30
    for m in members:
        s = m.shape
        assert s.duration_s == 7200 and s.burst_height == (3.0, 15.0)
        assert s.burst_width_s == (20.0, 240.0) and 300 <= s.burst_gap_s <= 1800
        assert 0.5 <= s.base_rps * s.service_mean_s <= 8.0 and 0.2 <= s.service_mean_s <= 2.0
        assert 0 <= s.ramps <= 2 and 0 <= s.silences <= 2 and 300 <= s.silence_s <= 1500
        assert 0 <= s.base_swing <= 0.6 and 0 <= s.rise <= 0.3


# Members never used while choosing the defaults (those came from seed 0; the benchmark
# reports seed 1000), shortened to 1 h to bound the test's time. Thresholds fixed before
# running: no rejection anywhere, both median ratios below 1, and a majority of members
# meeting both targets (the benchmark's distribution: docs/SCALER.md, "Trace family").
HELD_OUT_SEED, HELD_OUT = 7, 6
SIM = SimConfig(provision_s=60, startup_s=30, max_concurrency=8, slo_s=1.0,
                queue_timeout_s=600, max_queue=100_000, timeline_s=60)


def test_default_policy_against_kpa_and_hpa_on_held_out_members():
    rows = []
    for m in family(HELD_OUT, seed=HELD_OUT_SEED):
        trace = generate(dataclasses.replace(m.shape, duration_s=3600), m.seed)
        out = {}
        for name in ("concurrency", "kpa", "hpa"):
            pol = make_policy(name, target_concurrency=4, max_concurrency=8,
                              policy=PolicyConfig(), max_replicas=100)
            out[name] = simulate(trace, pol, SIM, name)
        ours, kpa, hpa = out["concurrency"], out["kpa"], out["hpa"]
        p99 = ours.p99_queue_delay_s / kpa.p99_queue_delay_s if kpa.p99_queue_delay_s else (
            1.0 if ours.p99_queue_delay_s == 0 else math.inf)
        a, b = ours.p99_queue_delay_s, kpa.p99_queue_delay_s
        rs = ours.replica_seconds / hpa.replica_seconds
        met = (a < b or a == b == 0) and rs < 1 and ours.rejected == 0
        rows.append((m.name, p99, rs, ours.rejected, met))
    report = "\n".join(f"{n}: p99/KPA {p:.2f}  replica-s/HPA {r:.2f}  rejected {x}"
                       for n, p, r, x, _ in rows)
    assert all(x == 0 for _, _, _, x, _ in rows), report
    assert statistics.median(p for _, p, _, _, _ in rows) < 1, report
    assert statistics.median(r for _, _, r, _, _ in rows) < 1, report
    assert sum(met for *_, met in rows) > HELD_OUT / 2, report
