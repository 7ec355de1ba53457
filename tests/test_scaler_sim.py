"""The simulator and traces: determinism, hand-checkable runs, the trace formats, the
`simulate --json` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from scaler import (PolicyConfig, SimConfig, Trace, TraceError, bursty, diurnal, load,
                    load_azure, load_csv, make_policy, simulate, write_csv)
from scaler.cli import main


def _run(trace, name="concurrency", **policy):
    pol = make_policy(name, target_concurrency=4, max_concurrency=8,
                      policy=PolicyConfig(**policy) if policy else None, max_replicas=100)
    return simulate(trace, pol, SimConfig(), name)


def test_same_seed_same_result_different_seed_different():
    a = _run(bursty(duration_s=900, seed=3), standby=2)
    b = _run(bursty(duration_s=900, seed=3), standby=2)
    c = _run(bursty(duration_s=900, seed=4), standby=2)
    assert a.summary() == b.summary() and a.timeline == b.timeline
    assert a.summary() != c.summary()
    for name in ("kpa", "hpa", "rayserve"):
        t = bursty(duration_s=600, seed=5)
        assert _run(t, name).summary() == _run(t, name).summary()


def test_light_load_on_one_replica_never_waits():
    t = Trace([i * 0.5 for i in range(600)], [0.2] * 600)  # concurrency 0.4
    for name in ("concurrency", "kpa", "hpa", "rayserve"):
        r = _run(t, name)
        assert r.p99_queue_delay_s == 0 and r.rejected == 0 and r.served == 600
        assert r.slo_attainment == 1.0 and r.cold_starts == 0


def test_scale_from_zero_waits_one_cold_start_and_counts_it():
    # Idle for 200 s (scales to zero), then one request: it waits provision + startup.
    t = Trace([0.0, 200.0], [0.1, 0.1])
    r = _run(t, "concurrency")
    assert r.rejected == 0 and r.cold_starts == 1 and r.provisions == 1
    assert r.p99_queue_delay_s == pytest.approx(90.0)


def _steps(n: int) -> Trace:
    """n steps from 2 to 40 req/s, each 240 s, 840 s apart."""
    arr: list[float] = []
    for k in range(n):
        t0 = k * 1080
        arr += [t0 + i / 2 for i in range(240)] + [t0 + 120 + i / 40 for i in range(40 * 240)]
        arr += [t0 + 360 + i / 2 for i in range(2 * 720)]
    return Trace(arr, [0.5] * len(arr))


def test_standby_skips_provisioning():
    # A fixed floor of 2 standby: the first replicas of the one step are the standby ones.
    one = _steps(1)
    cold = _run(one, standby=0)
    warm = _run(one, standby=2, min_standby=2)
    assert warm.p99_queue_delay_s < cold.p99_queue_delay_s - 30
    assert warm.rejected == cold.rejected == 0


def test_adaptive_standby_serves_the_second_step():
    # Adaptive standby (opt-in, standby=2): the first step finds nothing warm and leaves
    # 2 standby behind, so the second one waits startup only; on smooth load it costs
    # nothing. Headroom off, so that standby alone is measured.
    two = _steps(2)
    cold, adaptive = _run(two, burst_headroom=0), _run(two, standby=2, burst_headroom=0)
    assert adaptive.p95_queue_delay_s < cold.p95_queue_delay_s - 5
    assert adaptive.rejected == cold.rejected == 0
    smooth = Trace([i * 0.5 for i in range(600)], [0.2] * 600)
    assert _run(smooth, standby=2).replica_seconds == _run(smooth).replica_seconds


def test_queue_bound_and_deadline_reject_not_drop():
    t = Trace([0.0] * 50, [100.0] * 50)
    pol = make_policy("hpa", target_concurrency=4, max_concurrency=8)
    r = simulate(t, pol, SimConfig(max_queue=10, queue_timeout_s=5), "hpa")
    assert r.served + r.rejected == 50
    assert r.served == 8 and r.rejected == 42  # 8 slots; 32 over the bound, 10 expire


def test_csv_roundtrip_and_errors(tmp_path):
    t = bursty(duration_s=120, seed=1)
    p = tmp_path / "t.csv.gz"
    write_csv(t, p)
    u = load(p)
    assert len(u) == len(t) and u.arrivals[5] == pytest.approx(t.arrivals[5], abs=1e-4)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,dur\n1,2\n")
    with pytest.raises(TraceError):
        load(bad)
    bad.write_text("arrival_s,service_s\n1,x\n")
    with pytest.raises(TraceError):
        load_csv(bad)


def test_azure_functions_format(tmp_path):
    inv = tmp_path / "invocations_per_function_md.anon.d01.csv"
    inv.write_text("HashOwner,HashApp,HashFunction,Trigger,1,2,3\n"
                   "o1,a1,fA,http,3,0,2\n"
                   "o1,a1,fB,queue,1,1,1\n")
    dur = tmp_path / "function_durations_percentiles.anon.d01.csv"
    dur.write_text("HashOwner,HashApp,HashFunction,Average,Count,Minimum,Maximum\n"
                   "o1,a1,fA,250,5,1,900\n")
    t = load_azure(inv, function="fA", durations=dur, seed=1)
    assert len(t) == 5 and t.service == [0.25] * 5
    assert sum(a < 60 for a in t.arrivals) == 3 and sum(a >= 120 for a in t.arrivals) == 2
    both = load(inv, service_s=0.1)
    assert len(both) == 8 and both.arrivals == sorted(both.arrivals)
    with pytest.raises(TraceError):
        load_azure(inv, function="nope")


def test_generators_shape():
    b = bursty(duration_s=3600, base_rps=4, spike_factor=10, spike_s=300, spike_every_s=900, seed=1)
    per_min = [0] * 60
    for a in b.arrivals:
        per_min[int(a // 60)] += 1
    assert min(per_min) > 150 and max(per_min) > 8 * 240  # base ~240/min, spikes ~2400/min
    d = diurnal(duration_s=86400, peak_rps=1.0, seed=2)
    night = sum(a < 3 * 3600 for a in d.arrivals)
    noon = sum(10.5 * 3600 <= a < 13.5 * 3600 for a in d.arrivals)
    assert noon > 20 * max(1, night)


def test_simulate_json_cli(tmp_path):
    p = tmp_path / "t.csv"
    write_csv(bursty(duration_s=300, seed=2), p)
    r = CliRunner().invoke(main, ["simulate", "--trace", str(p), "--policy", "kpa",
                                  "--target-concurrency", "4", "--provision-s", "60",
                                  "--startup-s", "30", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for k in ("p50_queue_delay_s", "p99_queue_delay_s", "replica_seconds", "cold_starts",
              "rejected", "requests", "slo_attainment", "scale_events", "reversals"):
        assert k in out
    r = CliRunner().invoke(main, ["simulate", "--trace", str(p), "--standby", "2", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["policy"] == "concurrency"
