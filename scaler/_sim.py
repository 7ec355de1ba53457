"""Discrete-event simulation of replicas behind the queue, driven by a trace.

One model for every policy (docs/SCALER.md, "Simulator"): a central FIFO queue with a
bound and a deadline (the proxy, or Knative's activator); replicas with `max_concurrency`
slots; a request holds one slot for its service time; the least-loaded ready replica
takes the queue head. A new replica provisions (`provision_s`), then starts (`startup_s`:
image pull + weight load); a standby replica has been provisioned, so it only starts.
Pure and deterministic: no clock, no randomness (the trace carries it).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from ._config import SimConfig
from ._policy import Decision, Fleet, Policy, Sample
from ._trace import Trace


class State(Enum):
    PROVISIONING = "provisioning"   # will serve: getting a machine
    STARTING = "starting"           # will serve: pulling, loading
    READY = "ready"
    DRAINING = "draining"           # finishing in-flight requests, then gone (or standby)
    STANDBY_PROVISIONING = "standby-provisioning"
    STANDBY = "standby"             # provisioned, not serving


_SERVING = (State.PROVISIONING, State.STARTING, State.READY)
_STANDBY = (State.STANDBY_PROVISIONING, State.STANDBY)


@dataclass(eq=False)
class _Replica:
    id: int
    state: State
    busy: int = 0
    gen: int = 0            # bumps on every state change; stale phase events are ignored
    demote: bool = False    # when drained, become standby instead of going away


@dataclass(frozen=True, kw_only=True)
class SimResult:
    policy: str
    requests: int
    served: int
    rejected: int
    p50_queue_delay_s: float
    p95_queue_delay_s: float
    p99_queue_delay_s: float
    mean_queue_delay_s: float
    slo_s: float
    slo_attainment: float
    replica_seconds: float
    cold_starts: int
    provisions: int
    scale_events: int
    reversals: int
    max_replicas: int
    duration_s: float
    timeline: list[tuple[float, float, int, int]] = field(repr=False)

    def summary(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "timeline"}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


_ARRIVE, _DONE, _PHASE, _SAMPLE, _TICK, _POINT = range(6)


class Simulator:
    def __init__(self, trace: Trace, policy: Policy, config: SimConfig, name: str = "") -> None:
        self.trace, self.policy, self.c, self.name = trace, policy, config, name
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._replicas: dict[int, _Replica] = {}
        self._ready: list[_Replica] = []
        self._next_id = 0
        self._queue: deque[int] = deque()
        self._delays = [math.nan] * len(trace)
        self._in_flight = 0
        # Time integrals, advanced before every change.
        self._t = 0.0
        self._area_conc = self._area_busy = self._area_cap = self._area_repl = 0.0
        self._area_queued = 0.0
        self._arrived = 0                   # since the last sample
        self._svc_sum, self._svc_n = 0.0, 0  # completions since the last sample
        self._busy_ready = 0
        self._last_sample = (0.0, 0.0, 0.0, 0.0, 0.0)  # t and areas at the last sample
        self.rejected = 0
        self.cold_starts = self.provisions = self.scale_events = self.reversals = 0
        self._last_dir = 0
        self._peak = 0
        self._timeline: list[tuple[float, float, int, int]] = []
        self._arrivals_in_bin = 0

    # ------------------------------------------------------------------ events
    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, a, b))

    def run(self) -> SimResult:
        arr, svc = self.trace.arrivals, self.trace.service
        n = len(arr)
        for _ in range(self.c.initial_replicas):
            r = self._new(State.READY)
            self._ready.append(r)
        self._push(0.0, _SAMPLE)
        self._push(0.0, _TICK)
        self._push(self.c.timeline_s, _POINT)
        i = 0
        end_of_trace = self.trace.duration_s
        while True:
            next_arrival = arr[i] if i < n else math.inf
            if self._heap and self._heap[0][0] <= next_arrival:
                t, _, kind, a, b = heapq.heappop(self._heap)
                if t > end_of_trace and i >= n and not self._queue and self._in_flight == 0:
                    break
                self._advance(t)
                if kind == _DONE:
                    self._svc_sum += svc[b]
                    self._svc_n += 1
                    self._done(t, a)
                elif kind == _PHASE:
                    self._phase(t, a, b)
                elif kind == _SAMPLE:
                    self._sample(t)
                    self._push(t + self.policy.sample_s, _SAMPLE)
                elif kind == _TICK:
                    self._apply(t, self.policy.decide(t, self._fleet()))
                    self._push(t + self.policy.tick_s, _TICK)
                elif kind == _POINT:
                    self._point(t)
                    self._push(t + self.c.timeline_s, _POINT)
            elif i < n:
                t = next_arrival
                self._advance(t)
                self._arrive(t, i, svc[i])
                i += 1
            else:
                break
        return self._result(max(self._t, end_of_trace))

    def _advance(self, t: float) -> None:
        dt = t - self._t
        if dt > 0:
            self._area_conc += dt * (self._in_flight + len(self._queue))
            self._area_queued += dt * len(self._queue)
            self._area_busy += dt * self._busy_ready
            self._area_cap += dt * len(self._ready) * self.c.max_concurrency
            self._area_repl += dt * len(self._replicas)
            self._t = t

    # ------------------------------------------------------------------ requests
    def _arrive(self, t: float, i: int, service: float) -> None:
        self._arrivals_in_bin += 1
        self._arrived += 1
        self._expire(t)
        if len(self._queue) >= self.c.max_queue:
            self.rejected += 1
            return
        self._queue.append(i)
        self._dispatch(t)
        if self._queue and not any(r.state in _SERVING for r in self._replicas.values()):
            # The activator's poke: a request at zero triggers a decision at once,
            # with the instantaneous concurrency as the newest sample.
            q = float(len(self._queue))
            self.policy.record(t, Sample(concurrency=q + self._in_flight, queued=q))
            self._apply(t, self.policy.decide(t, self._fleet()))

    def _expire(self, t: float) -> None:
        arr, limit = self.trace.arrivals, self.c.queue_timeout_s
        while self._queue and t - arr[self._queue[0]] > limit:
            self._queue.popleft()
            self.rejected += 1

    def _dispatch(self, t: float) -> None:
        self._expire(t)
        cap = self.c.max_concurrency
        while self._queue and self._ready:
            best = min(self._ready, key=lambda r: r.busy)
            if best.busy >= cap:
                return
            i = self._queue.popleft()
            self._delays[i] = t - self.trace.arrivals[i]
            best.busy += 1
            self._busy_ready += 1
            self._in_flight += 1
            self._push(t + self.trace.service[i], _DONE, best.id, i)

    def _done(self, t: float, rid: int) -> None:
        r = self._replicas[rid]
        r.busy -= 1
        self._in_flight -= 1
        if r.state is State.READY:
            self._busy_ready -= 1
        elif r.state is State.DRAINING and r.busy == 0:
            self._finish_drain(r)
        self._dispatch(t)

    # ------------------------------------------------------------------ replicas
    def _new(self, state: State) -> _Replica:
        r = _Replica(self._next_id, state)
        self._next_id += 1
        self._replicas[r.id] = r
        self._peak = max(self._peak, len(self._replicas))
        return r

    def _set(self, r: _Replica, state: State, t: float, after: float | None = None) -> None:
        if r.state is State.READY and state is not State.READY:
            self._ready.remove(r)
            self._busy_ready -= r.busy
        r.state = state
        r.gen += 1
        if state is State.READY:
            self._ready.append(r)
            self._busy_ready += r.busy
        if state is State.STARTING:
            self.cold_starts += 1
        if after is not None:
            self._push(t + after, _PHASE, r.id, r.gen)

    def _provision(self, r: _Replica, t: float) -> None:
        self.provisions += 1
        r.gen += 1
        self._push(t + self.c.provision_s, _PHASE, r.id, r.gen)

    def _phase(self, t: float, rid: int, gen: int) -> None:
        r = self._replicas.get(rid)
        if r is None or r.gen != gen:
            return
        if r.state is State.PROVISIONING:
            self._set(r, State.STARTING, t, self.c.startup_s)
        elif r.state is State.STARTING:
            self._set(r, State.READY, t)
            self._dispatch(t)
        elif r.state is State.STANDBY_PROVISIONING:
            self._set(r, State.STANDBY, t)

    def _remove(self, r: _Replica) -> None:
        if r.state is State.READY:
            self._ready.remove(r)
            self._busy_ready -= r.busy
        del self._replicas[r.id]

    def _finish_drain(self, r: _Replica) -> None:
        if r.demote:
            r.demote = False
            r.state, r.gen = State.STANDBY, r.gen + 1
        else:
            del self._replicas[r.id]

    def _fleet(self) -> Fleet:
        counts = {s: 0 for s in State}
        for r in self._replicas.values():
            counts[r.state] += 1
        return Fleet(ready=counts[State.READY],
                     starting=counts[State.PROVISIONING] + counts[State.STARTING],
                     standby=counts[State.STANDBY] + counts[State.STANDBY_PROVISIONING])

    def _apply(self, t: float, d: Decision) -> None:
        """Converge the replicas to the decision, as an actuator would."""
        by = lambda *states: [r for r in self._replicas.values() if r.state in states]  # noqa: E731
        serving = by(*_SERVING)
        delta = d.serving - len(serving)
        if delta:
            direction = 1 if delta > 0 else -1
            self.scale_events += 1
            if self._last_dir and direction != self._last_dir:
                self.reversals += 1
            self._last_dir = direction
        if delta > 0:
            # Standby first: warm (already provisioned) before still provisioning.
            spare = by(State.STANDBY) + by(State.STANDBY_PROVISIONING)
            for r in spare[:delta]:
                if r.state is State.STANDBY:
                    self._set(r, State.STARTING, t, self.c.startup_s)
                else:
                    r.state = State.PROVISIONING  # its provisioning goes on; same gen
            for _ in range(delta - len(spare[:delta])):
                self._provision(self._new(State.PROVISIONING), t)
        elif delta < 0:
            # Least sunk cost first: still provisioning, then starting, then idle ready.
            order = (by(State.PROVISIONING)[::-1] + by(State.STARTING)[::-1]
                     + sorted(by(State.READY), key=lambda r: r.busy))
            standby = len(by(*_STANDBY)) + sum(r.demote for r in by(State.DRAINING))
            for r in order[:-delta]:
                keep = standby < d.standby
                standby += keep
                if r.state is State.PROVISIONING:
                    if keep:
                        r.state = State.STANDBY_PROVISIONING
                    else:
                        self._remove(r)
                elif r.state is State.STARTING:
                    if keep:
                        self._set(r, State.STANDBY, t)
                    else:
                        self._remove(r)
                else:
                    r.demote = keep
                    self._set(r, State.DRAINING, t)
                    if r.busy == 0:
                        self._finish_drain(r)
        standby = by(*_STANDBY)
        pending = sum(r.demote for r in by(State.DRAINING))
        missing = d.standby - len(standby) - pending
        for _ in range(missing):
            self._provision(self._new(State.STANDBY_PROVISIONING), t)
        if missing < 0:
            extra = by(State.STANDBY_PROVISIONING)[::-1] + by(State.STANDBY)
            for r in extra[:-missing]:
                self._remove(r)
        self._peak = max(self._peak, len(self._replicas))
        self._dispatch(t)

    # ------------------------------------------------------------------ observation
    def _sample(self, t: float) -> None:
        t0, c0, b0, k0, q0 = self._last_sample
        dt = t - t0
        if dt <= 0:
            return
        self.policy.record(t, Sample(
            concurrency=(self._area_conc - c0) / dt, busy=(self._area_busy - b0) / dt,
            capacity=(self._area_cap - k0) / dt, queued=(self._area_queued - q0) / dt,
            arrival_rate=self._arrived / dt,
            service_s=self._svc_sum / self._svc_n if self._svc_n else 0.0,
            completed=float(self._svc_n)))
        self._arrived, self._svc_sum, self._svc_n = 0, 0.0, 0
        self._last_sample = (t, self._area_conc, self._area_busy, self._area_cap,
                             self._area_queued)

    def _point(self, t: float) -> None:
        rate = self._arrivals_in_bin / self.c.timeline_s
        self._arrivals_in_bin = 0
        self._timeline.append((t, rate, len(self._ready), len(self._replicas)))

    def _result(self, end: float) -> SimResult:
        served = sorted(d for d in self._delays if not math.isnan(d))
        n = len(self._delays)

        def pct(p: float) -> float:
            if not served:
                return 0.0
            return served[min(len(served) - 1, max(0, math.ceil(p / 100 * len(served)) - 1))]

        met = sum(1 for d in served if d <= self.c.slo_s)
        return SimResult(
            policy=self.name, requests=n, served=len(served), rejected=self.rejected,
            p50_queue_delay_s=pct(50), p95_queue_delay_s=pct(95), p99_queue_delay_s=pct(99),
            mean_queue_delay_s=(sum(served) / len(served)) if served else 0.0,
            slo_s=self.c.slo_s, slo_attainment=met / n if n else 1.0,
            replica_seconds=self._area_repl, cold_starts=self.cold_starts,
            provisions=self.provisions, scale_events=self.scale_events,
            reversals=self.reversals, max_replicas=self._peak, duration_s=end,
            timeline=self._timeline)


def simulate(trace: Trace, policy: Policy, config: SimConfig, name: str = "") -> SimResult:
    return Simulator(trace, policy, config, name).run()
