"""The single-flight table, the pure core of the chunk path: no trio run needed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfs.errors import OriginUnavailable
from p2pfs.store import FlightTable


def test_the_first_claim_owns_later_ones_join():
    table = FlightTable()
    (a,), (owned,) = table.claim(["d1"])
    (b,), (owned2,) = table.claim(["d1"])
    assert owned and not owned2 and a is b
    assert "d1" in table and len(table) == 1


def test_a_digest_twice_in_one_claim_is_owned_once():
    table = FlightTable()
    flights, owned = table.claim(["d", "d", "e"])
    assert owned == [True, False, True]
    assert flights[0] is flights[1] and flights[0] is not flights[2]


def test_landing_ends_once_and_frees_the_digest():
    table = FlightTable()
    (f,), _ = table.claim(["d"])
    assert table.land(f, b"data", "origin")
    assert f.done and f.data == b"data" and f.source == "origin" and f.error is None
    assert "d" not in table
    assert not table.fail(f, OriginUnavailable("late"))  # ending again is a no-op
    assert f.error is None and f.data == b"data"
    (g,), (owned,) = table.claim(["d"])  # the next claim starts a fresh flight
    assert owned and g is not f and not g.done


def test_failing_hands_the_error_to_waiters():
    table = FlightTable()
    (f,), _ = table.claim(["d"])
    assert table.join("d") is f and f.waiters == 1
    err = OriginUnavailable("down")
    assert table.fail(f, err)
    assert f.done and f.error is err and f.data is None
    assert table.join("d") is None


def test_an_old_flight_never_removes_its_successor():
    table = FlightTable()
    (f,), _ = table.claim(["d"])
    table.fail(f, OriginUnavailable("x"))
    (g,), _ = table.claim(["d"])
    table.land(f, b"stale", "origin")  # already ended: must not touch g's entry
    assert table.get("d") is g and not g.done


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["claim", "land", "fail"]),
                          st.sampled_from(["a", "b", "c"])), max_size=60))
def test_at_most_one_live_flight_per_digest(ops):
    table = FlightTable()
    live: dict[str, object] = {}
    for op, digest in ops:
        if op == "claim":
            (f,), (owned,) = table.claim([digest])
            assert owned == (digest not in live)
            live.setdefault(digest, f)
            assert live[digest] is f
        elif digest in live:
            f = live.pop(digest)
            ended = table.land(f, b"x", "disk") if op == "land" else table.fail(f, OriginUnavailable("x"))
            assert ended and f.done
        assert len(table) == len(live)
        for d, f in live.items():
            assert table.get(d) is f and not f.done
