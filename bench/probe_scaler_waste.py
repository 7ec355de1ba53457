"""Probe: how much of the default policy's cost is replicas that never served, and what the
targets would look like if those cost nothing (docs/SCALER.md, "How far this is from the
target").

    .venv/bin/python bench/probe_scaler_waste.py [--seed 0] [--count 60] [--burst-headroom 3,4,5]

A replica is *wasted* when it is removed before it was ever ready: ordered for a burst that
ended, or whose queue cleared, before the replica could arrive (the simulator bills every
replica from its order). Per burst-headroom value, on the family members: p99 below KPA's,
replica-seconds below HPA's, all three (nothing rejected), and the same with each trace's
wasted replica-seconds subtracted before the comparison with the HPA: an upper bound no
rule reaches (a burst's width is not known when it starts). Deterministic; about 2 minutes
per 60 traces and setting on this VM.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_scaler_family import MAX_CONC, MAX_REPLICAS, SIM, TARGET  # noqa: E402

from scaler import PolicyConfig, family, make_policy  # noqa: E402
from scaler._sim import Simulator, State  # noqa: E402


class WasteCounting(Simulator):
    """The simulator, counting the replica-seconds of replicas removed before ready."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.born: dict[int, float] = {}
        self.was_ready: set[int] = set()
        self.wasted = 0.0

    def _new(self, state):
        r = super()._new(state)
        self.born[r.id] = self._t
        return r

    def _set(self, r, state, t, after=None):
        if state is State.READY:
            self.was_ready.add(r.id)
        super()._set(r, state, t, after)

    def _remove(self, r):
        if r.id not in self.was_ready:
            self.wasted += self._t - self.born[r.id]
        super()._remove(r)


def run(trace, name: str, policy: PolicyConfig | None = None):
    pol = make_policy(name, target_concurrency=TARGET, max_concurrency=MAX_CONC,
                      max_replicas=MAX_REPLICAS, policy=policy)
    sim = WasteCounting(trace, pol, SIM, name)
    return sim.run(), sim.wasted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--burst-headroom", dest="headroom", default="3,4,5")
    args = ap.parse_args()
    members = family(args.count, args.seed)
    traces = [m.trace() for m in members]
    kpa = [run(t, "kpa")[0].p99_queue_delay_s for t in traces]
    hpa = [run(t, "hpa")[0].replica_seconds for t in traces]
    for h in (float(x) for x in args.headroom.split(",")):
        cfg = dataclasses.replace(PolicyConfig(), burst_headroom=h)
        p99 = cost = cost_free = ok = ok_free = 0
        total = wasted = 0.0
        for t, k, c in zip(traces, kpa, hpa):
            r, w = run(t, "concurrency", cfg)
            total, wasted = total + r.replica_seconds, wasted + w
            beats = r.p99_queue_delay_s < k or (k <= 0 and r.p99_queue_delay_s <= 0)
            p99 += beats
            cost += r.replica_seconds < c
            cost_free += r.replica_seconds - w < c
            ok += beats and r.replica_seconds < c and r.rejected == 0
            ok_free += beats and r.replica_seconds - w < c and r.rejected == 0
        print(f"burst_headroom {h:g}: wasted {wasted / total:.1%} of replica-seconds; "
              f"p99 < KPA on {p99}, replica-s < HPA on {cost} ({cost_free} if waste were "
              f"free), all three on {ok} ({ok_free}) of {len(traces)}", flush=True)


if __name__ == "__main__":
    main()
