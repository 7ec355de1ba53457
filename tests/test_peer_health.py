"""Passive peer health (down/up), bans (doubling, cap, forgiveness), latency, hedge budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from p2pfs.peer._health import HedgeBudget, PeerHealth

P = "127.0.0.3:7946"


def health(**kw) -> PeerHealth:
    return PeerHealth(**{"fail_window": 10.0, "fail_threshold": 3, "down_for": 5.0,
                         "ban_base": 30.0, "ban_max": 3600.0, **kw})


def test_unknown_peer_is_up():
    assert health().state(P, 0.0) == "up" and health().usable(P, 0.0)


def test_down_after_threshold_within_window_then_recovers():
    h = health()
    h.failure(P, 100.0, "timeout")
    h.failure(P, 104.0)
    assert h.usable(P, 104.0)
    h.failure(P, 109.9)  # third within 10 s of the first
    assert h.state(P, 109.9) == "down" and not h.usable(P, 114.8)
    assert h.snapshot(110.0)[P]["until"] == pytest.approx(114.9)
    assert h.state(P, 114.9) == "up"
    assert h.snapshot(115.0)[P] | {"until": None} == {
        "state": "up", "until": None, "bans": 0, "failures": 3, "successes": 0,
        "last_error": "timeout"}


def test_failures_spread_over_more_than_the_window_do_not_take_it_down():
    h = health()
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):
        h.failure(P, t)
        assert h.usable(P, t)


def test_a_success_resets_the_streak():
    h = health()
    h.failure(P, 0.0)
    h.failure(P, 1.0)
    h.success(P, 1.5, 0.01)
    h.failure(P, 2.0)
    h.failure(P, 3.0)
    assert h.usable(P, 3.0)
    h.failure(P, 4.0)
    assert h.state(P, 4.0) == "down"


def test_failures_while_down_do_not_extend_it():
    h = health()
    for t in (0.0, 0.1, 0.2):
        h.failure(P, t)
    for t in (1.0, 2.0, 3.0, 4.0):  # answers still in flight when it went down
        h.failure(P, t)
    assert h.state(P, 5.2) == "up"


def test_ban_doubles_and_caps():
    h = health(ban_base=30.0, ban_max=200.0)
    t = 0.0
    lengths = []
    for _ in range(5):
        lengths.append(h.ban(P, t, "sha256 mismatch"))
        assert h.state(P, t) == "banned" and not h.usable(P, t)
        t += lengths[-1]
        assert h.state(P, t) == "up"
        t += 1.0  # a fresh offence soon after the ban ended
    assert lengths == [30.0, 60.0, 120.0, 200.0, 200.0]
    snap = h.snapshot(t)[P]
    assert snap["bans"] == 5 and snap["last_error"] == "sha256 mismatch"


def test_ban_while_banned_does_not_double():
    h = health()
    assert h.ban(P, 0.0, "bad bytes") == 30.0
    assert h.ban(P, 1.0, "bad bytes again") == 29.0
    assert h.state(P, 29.9) == "banned" and h.state(P, 30.0) == "up"
    assert h.ban(P, 31.0, "x") == 60.0


def test_ban_history_forgiven_after_ban_max_clean():
    h = health(ban_base=10.0, ban_max=100.0)
    h.ban(P, 0.0, "a")
    h.ban(P, 11.0, "b")  # 20 s, ends at 31
    assert h.ban(P, 31.0 + 99.0, "c") == 40.0  # not clean long enough: doubles
    assert h.ban(P, 170.0 + 100.0, "d") == 10.0  # 100 s clean after the 40 s ban: reset


def test_ban_beats_down():
    h = health()
    for t in (0.0, 0.1, 0.2):
        h.failure(P, t)
    h.ban(P, 0.3, "protocol")
    assert h.state(P, 1.0) == "banned"
    assert h.state(P, 20.0) == "banned"


def test_latency_quantile_nearest_rank():
    h = health()
    assert h.latency_quantile(0.9) is None
    for i, lat in enumerate([0.5, 0.1, 0.4, 0.2, 0.3] * 2):
        h.success(f"p{i % 3}", float(i), lat)
    assert h.latency_quantile(0.0) == 0.1
    assert h.latency_quantile(0.5) == 0.3
    assert h.latency_quantile(0.9) == 0.5
    assert h.latency_quantile(1.0) == 0.5
    with pytest.raises(ValueError):
        h.latency_quantile(1.5)


def test_latency_ring_keeps_only_recent_samples():
    h = health(samples=100)
    for i in range(100):
        h.success(P, float(i), 10.0)
    for i in range(100):
        h.success(P, 100.0 + i, 0.001)
    assert h.latency_quantile(1.0) == 0.001


def test_quiet_peers_are_forgotten_but_ban_history_is_kept():
    h = health(ban_base=10.0, ban_max=100.0, forget_after=50.0)
    for i in range(1000):
        h.success(f"10.0.{i // 250}.{i % 250}:1", 0.0, 0.01)
    h.ban(P, 0.0, "bad")
    h.success("keeper:1", 60.0, 0.01)
    assert set(h.snapshot(60.0)) == {"keeper:1", P}
    # The banned peer is kept until ban_max after its ban ended, so doubling still applies.
    assert h.ban(P, 105.0, "again") == 20.0
    h.success("keeper:1", 10_000.0, 0.01)
    assert set(h.snapshot(10_000.0)) == {"keeper:1"}


@given(st.floats(0.0, 0.5), st.floats(0.0, 20.0),
       st.lists(st.booleans(), max_size=2000))  # True: a request; False: a wish to hedge
def test_hedges_never_exceed_fraction_of_requests_plus_burst(fraction, burst, events):
    b = HedgeBudget(fraction=fraction, burst=burst)
    requests = hedges = 0
    for is_request in events:
        if is_request:
            b.on_request()
            requests += 1
        elif b.try_spend():
            hedges += 1
        assert hedges <= fraction * requests + 1e-9
        assert hedges <= fraction * requests + burst + 1e-9
    assert (b.requests, b.hedges) == (requests, hedges)


def test_hedge_budget_earns_and_caps():
    b = HedgeBudget(fraction=0.25, burst=2.0)
    assert not b.try_spend()  # starts empty
    for _ in range(4):
        b.on_request()
    assert b.try_spend() and not b.try_spend()
    for _ in range(100):
        b.on_request()
    assert [b.try_spend() for _ in range(3)] == [True, True, False]  # burst caps the savings
    b = HedgeBudget(fraction=0.0, burst=5.0, initial=5.0)
    assert sum(b.try_spend() for _ in range(10)) == 5


def test_bad_parameters():
    with pytest.raises(ValueError):
        PeerHealth(fail_threshold=0)
    with pytest.raises(ValueError):
        PeerHealth(ban_base=10.0, ban_max=5.0)
    with pytest.raises(ValueError):
        HedgeBudget(fraction=1.5)
    with pytest.raises(ValueError):
        HedgeBudget(burst=1.0, initial=2.0)
    assert math.isfinite(PeerHealth().ban(P, 0.0, "x"))


def test_a_peer_on_probation_goes_down_at_its_first_failure_for_twice_as_long():
    h = PeerHealth(fail_window=10.0, fail_threshold=3, down_for=5.0)
    for t in (0.0, 0.1, 0.2):
        h.failure("p", t)
    assert h.state("p", 4.9) == "down" and h.state("p", 5.3) == "up"
    h.failure("p", 6.0)  # probation: one failure is enough, and the period doubles
    assert h.state("p", 15.9) == "down" and h.state("p", 16.1) == "up"
    h.failure("p", 17.0)
    assert h.state("p", 36.9) == "down"
    for k in range(10):  # capped at 16x down_for
        h.failure("p", 1000.0 * (k + 1))
    assert h.state("p", 10000.0 + 80.1) == "up"
    h.success("p", 20000.0, 0.01)  # a success ends probation
    h.failure("p", 20001.0)
    assert h.state("p", 20001.1) == "up"
