"""Replica starts timed stage by stage: the pure records, then real replica processes
behind the real proxy (status, /metrics, the status CLI), a promoted standby, and the
simulator taking measured figures (`simulate --cold-start-from`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio
from hypothesis import given, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from scaler import (ConcurrencyPolicy, LocalActuator, LocalConfig, PolicyConfig, ProxyConfig,
                    run_proxy, write_csv, bursty)
from scaler import _http
from scaler._starts import Start, StartLog, cold_start_figures, parse_ready_body

from scaler_helpers import replica_cmd

SCALER = [sys.executable, "-m", "scaler.cli"]


# ------------------------------------------------------------------ pure records

def test_cold_start_stages_follow_the_timestamps():
    s = Start("r-1", "cold", "serving", decided=10.0, began=10.25, image_s=1.5, setup_s=0.5,
              process_started=12.25, ready=15.0, reported_weights_s=1.0)
    assert s.stages() == {"provision": 0.25, "image": 1.5, "weights": 1.5,
                          "server_init": 1.75, "first_answer": None, "total": 5.0}
    log = StartLog()
    log.begin(s)
    assert log.answered("r-1", 15.5) is s
    assert log.answered("r-1", 16.0) is None  # only the first answer ends a start
    assert s.stages()["first_answer"] == 0.5 and s.stages()["total"] == 5.5
    assert log.sums[("cold", "total")] == (1, 5.5)
    assert s.as_dict()["state"] == "answered"
    assert "weights 1.50s" in s.log_line()


def test_promotion_and_unreported_weights():
    p = Start("r-2", "promotion", "standby", decided=3.0, ready=3.01)
    assert p.stages()["promote"] == pytest.approx(0.01) and p.stages()["first_answer"] is None
    c = Start("r-3", "cold", "serving", decided=0.0, began=0.0, image_s=0.0,
              process_started=0.0, ready=2.0)
    assert c.stages()["weights"] is None and c.stages()["server_init"] == 2.0


def test_a_start_that_never_got_ready_is_failed_and_not_counted():
    log = StartLog()
    s = log.begin(Start("r-4", "cold", "serving", decided=0.0, began=0.1))
    log.failed(s, "exited with 1 before ready")
    assert log.answered("r-4", 5.0) is None and not log.sums
    assert s.as_dict()["state"] == "failed" and s.as_dict()["error"].startswith("exited")


@pytest.mark.parametrize("body", [b"", b"ok\n", b"[]", b'{"stages": 1}', b'{"stages": {"weights": true}}',
                                  b'{"stages": {"weights": -1}}', b'{"stages": {"weights": "2"}}',
                                  b'{"stages": {"weights": 1e400}}', b"[" * 100000, b"\xff\xfe"])
def test_hostile_ready_answers_are_no_report(body):
    assert parse_ready_body(body) is None


@given(st.floats(min_value=0, max_value=1e5, allow_nan=False))
def test_a_reported_load_time_reads_back(v):
    assert parse_ready_body(json.dumps({"ok": True, "stages": {"weights": v}}).encode()) == v


def test_cold_start_figures_are_medians_over_ready_cold_starts():
    starts = [{"kind": "cold", "state": "answered",
               "stages": {"provision": p, "image": 1.0, "weights": w, "server_init": 0.5}}
              for p, w in ((0.0, 1.0), (0.5, 2.0), (1.0, 9.0))]
    starts += [{"kind": "promotion", "state": "answered", "stages": {"promote": 0.01}},
               {"kind": "cold", "state": "failed", "stages": {"image": 100.0}}]
    assert cold_start_figures({"starts": starts}) == (0.5, 3.5, 3)
    with pytest.raises(ValueError):
        cold_start_figures({"starts": starts[3:]})
    with pytest.raises(ValueError):
        cold_start_figures({"replicas": {}})


# ------------------------------------------------------------------ real replicas

# One replica at most: the request waits through the whole cold start, so the stable
# window reads a demand of ~1, and the headroom rule (2.5x the demand, 2 slots a replica)
# rightly asks for a second replica at the first tick after the first is ready. Under
# load that tick can come before the status read; this test is about one start's stages.
POLICY = PolicyConfig(target_concurrency=2, stable_window_s=3, panic_window_s=1, tick_s=0.25,
                      sample_s=0.25, scale_to_zero_grace_s=60, min_replicas=0, max_replicas=1)
PROXY = ProxyConfig(port=0, max_concurrency=2, queue_timeout_s=30, max_queue=50)


def _actuator(**kw) -> LocalActuator:
    return LocalActuator(LocalConfig(probe_interval_s=0.05, stop_timeout_s=3, drain_timeout_s=2,
                                     start_timeout_s=20, **kw))


@pytest.mark.trio
async def test_a_request_at_zero_reports_every_stage(tmp_path):
    act = _actuator(replica_cmd=replica_cmd(delay=0.05, weights_s=0.6))
    async with trio.open_nursery() as nursery:
        run = await nursery.start(run_proxy, PROXY, ConcurrencyPolicy(POLICY), act)
        with trio.fail_after(30):
            resp = await _http.get("127.0.0.1", run.port, "/embed", timeout=30)
        assert resp.status == 200
        doc = json.loads((await _http.get("127.0.0.1", run.port, "/-/status", timeout=5)).body)
        assert doc["replicas"]["serving"] == 1
        [start] = doc["starts"]
        st_ = start["stages"]
        assert start["kind"] == "cold" and start["state"] == "answered"
        assert st_["weights"] == pytest.approx(0.6)
        assert st_["server_init"] >= 0 and st_["first_answer"] >= 0.05  # the replica's delay
        assert st_["image"] == 0 and 0 <= st_["provision"] < 1.0
        parts = sum(st_[k] for k in ("provision", "image", "weights", "server_init", "first_answer"))
        assert st_["total"] == pytest.approx(parts, abs=0.01)
        assert doc["replica_list"][0]["state"] == "serving"

        metrics = (await _http.get("127.0.0.1", run.port, "/metrics", timeout=5)).body.decode()
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert got[("scaler_replica_start_seconds_count", (("kind", "cold"), ("stage", "total")))] == 1
        assert got[("scaler_replica_start_seconds_sum", (("kind", "cold"), ("stage", "weights")))] == \
            pytest.approx(0.6)
        assert got[("scaler_replica_last_start_seconds", (("kind", "cold"), ("stage", "total")))] == \
            pytest.approx(st_["total"])

        out = await trio.to_thread.run_sync(lambda: subprocess.run(
            [*SCALER, "status", "--addr", f"127.0.0.1:{run.port}"], capture_output=True,
            text=True, timeout=20))
        assert out.returncode == 0, out.stderr
        assert "server_init" in out.stdout and "serving 1" in out.stdout
        status_file = tmp_path / "status.json"
        out = await trio.to_thread.run_sync(lambda: subprocess.run(
            [*SCALER, "status", "--addr", f"127.0.0.1:{run.port}", "--json"],
            capture_output=True, text=True, timeout=20))
        status_file.write_text(out.stdout)
        assert json.loads(out.stdout)["starts"][0]["stages"] == st_
        nursery.cancel_scope.cancel()
    assert not act.pids()

    # The simulator takes the measured figures: the same result as passing them by hand.
    trace = tmp_path / "t.csv"
    write_csv(bursty(duration_s=300, base_rps=1.0, spike_every_s=120, spike_s=20), trace)
    prov, startup, _ = cold_start_figures(json.loads(status_file.read_text()))
    sim = [*SCALER, "simulate", "--trace", str(trace), "--json"]
    measured = subprocess.run([*sim, "--cold-start-from", str(status_file)], capture_output=True,
                              text=True, timeout=60, check=True)
    by_hand = subprocess.run([*sim, "--provision-s", str(round(prov, 3)),
                              "--startup-s", str(round(startup, 3))],
                             capture_output=True, text=True, timeout=60, check=True)
    default = subprocess.run(sim, capture_output=True, text=True, timeout=60, check=True)

    def result(p):
        return {k: v for k, v in json.loads(p.stdout).items() if k != "wall_s"}

    assert result(measured) == result(by_hand) != result(default)
    assert "1 measured starts" in measured.stderr


def test_cold_start_from_a_file_that_is_no_status_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"replicas": {}}')
    trace = tmp_path / "t.csv"
    write_csv(bursty(duration_s=60), trace)
    r = subprocess.run([*SCALER, "simulate", "--trace", str(trace), "--cold-start-from", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cold-start-from" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_status_of_nothing_listening_is_one_line():
    r = subprocess.run([*SCALER, "status", "--addr", "127.0.0.1:9", "--timeout", "2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "p2pfs-scaler proxy" in r.stderr


class _Hooks:
    def __init__(self) -> None:
        self.routed: list[str] = []

    def ready(self, ep) -> None:
        self.routed.append(ep.id)

    async def drain(self, ep_id, timeout) -> None:
        return None

    def gone(self, ep_id) -> None:
        return None


@pytest.mark.trio
async def test_a_promoted_standby_is_routed_at_once_and_timed():
    act = _actuator(replica_cmd=replica_cmd(weights_s=0.3))
    hooks = _Hooks()
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, hooks)
        act.set_target(0, 1)
        with trio.fail_after(20):
            while act.fleet().standby < 1 or not any(r["state"] == "standby" for r in act.replicas()):
                await trio.sleep(0.05)
        assert hooks.routed == []  # a standby gets no traffic
        act.set_target(1, 0)
        with trio.fail_after(2):
            while not hooks.routed:
                await trio.sleep(0.005)
        [rid] = hooks.routed
        act.endpoint_answered(rid)
        kinds = [s.kind for s in act.start_records()]
        assert kinds == ["cold", "promotion"]
        promo = act.start_records()[-1].stages()
        assert promo["promote"] < 0.5 and promo["first_answer"] is not None
        assert act.start_records()[0].stages()["weights"] == pytest.approx(0.3)
        assert act.started == 1  # promoted, not started again
        nursery.cancel_scope.cancel()
    assert not act.pids()


@pytest.mark.trio
async def test_a_replica_that_crashes_at_once_is_restarted_with_backoff():
    # Before the backoff, this restarted ~25 times a second (found with a container
    # whose start failed at once: 1,400 starts in a minute).
    act = _actuator(replica_cmd="/bin/false {port}")
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, _Hooks())
        act.set_target(1, 0)
        await trio.sleep(3.2)  # starts at 0, +0.5, +1, +2 (backoff 0.5 s doubling)
        assert 3 <= act.started <= 5, act.started
        assert all(s.failed for s in act.start_records()[:-1])  # the last may be waiting
        nursery.cancel_scope.cancel()
    assert not act.pids()
