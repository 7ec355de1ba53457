"""The concurrency policy: a pure decision function over concurrency samples.

Inputs are plain data (`Sample`, `Fleet`) and `now`; the output is a `Decision` (serving
and standby replica counts). The simulator and the proxy's controller both drive it, so
what is tested here is what runs. The algorithm follows Knative's KPA (stable and panic
windows, rate limits, scale-down delay, scale-to-zero grace) with three changes: the
target is used as given (no 70% utilization factor), a queue backlog is discounted
(`effective_concurrency`), and standby replicas follow the recent scale step (`_standby`;
docs/SCALER.md, "Standby replicas").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ._config import PolicyConfig
from ._window import WindowAverage, WindowMax


@dataclass(frozen=True, kw_only=True)
class Sample:
    """Time averages over one sample period."""

    #: Requests in flight at replicas plus requests queued in the proxy.
    concurrency: float
    #: Busy request slots on ready replicas (what a utilization metric sees).
    busy: float = 0.0
    #: Request slots of ready replicas (ready * max_concurrency).
    capacity: float = 0.0
    #: Of `concurrency`, the part waiting in the queue.
    queued: float = 0.0
    #: Requests arriving per second.
    arrival_rate: float = 0.0
    #: Mean seconds replicas took per request completed in the period (0: none completed).
    service_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """Replicas as the actuator sees them now."""

    #: Serving and ready for requests.
    ready: int = 0
    #: Will serve once started (provisioning, pulling, loading).
    starting: int = 0
    #: Warm, not serving (provisioned, or still provisioning for standby).
    standby: int = 0

    @property
    def serving(self) -> int:
        return self.ready + self.starting


@dataclass(frozen=True, kw_only=True)
class Decision:
    serving: int
    standby: int = 0
    #: Why, for logs and tests: "stable", "panic", "delay", "grace", "activate", ...
    mode: str = "stable"


class Policy(Protocol):
    """What the simulator and the controller need from a policy."""

    #: Seconds between `decide` calls.
    tick_s: float
    #: Seconds between `record` calls.
    sample_s: float

    def record(self, now: float, sample: Sample) -> None: ...

    def decide(self, now: float, fleet: Fleet) -> Decision: ...


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class ConcurrencyPolicy:
    """desired = ceil(windowed concurrency / target), KPA-style panic and rate limits."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.tick_s = config.tick_s
        self.sample_s = config.sample_s
        self._stable = WindowAverage(config.stable_window_s)
        self._panic = WindowAverage(config.panic_window_s)
        self._delay = WindowMax(config.scale_down_delay_s) if config.scale_down_delay_s else None
        self._panic_since: float | None = None  # last time over the panic threshold
        self._max_panic = 0
        self._last_nonzero: float | None = None  # last decision with a non-zero count
        self._service_s = 0.0  # newest measured mean service time
        # Standby follows the scale step: overloaded scale-up steps in the decay window,
        # and the raw load against the ready slots over the panic window to tell them.
        self._steps = WindowMax(config.standby_decay_s)
        self._load = WindowAverage(config.panic_window_s)
        self._slots = WindowAverage(config.panic_window_s)

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def averages(self, now: float) -> tuple[float, float]:
        """(stable, panic) window averages of the effective concurrency."""
        return self._stable.average(now), self._panic.average(now)

    def record(self, now: float, sample: Sample) -> None:
        value = self.effective_concurrency(sample)
        self._stable.record(now, value)
        self._panic.record(now, value)
        self._load.record(now, sample.concurrency)
        self._slots.record(now, sample.capacity)

    def effective_concurrency(self, sample: Sample) -> float:
        """The sample's concurrency, with a queue backlog discounted (backlog_drain_s).

        While requests queue because capacity is short (replicas still starting), the
        concurrency grows with the wait, not with demand: Little's law gives
        concurrency = arrival rate x (service + wait). Counting all of it asks for
        replicas that arrive after the backlog is gone, and once they do, the backlog
        they drain shows up as in-flight work and asks for more again. So, in a sample
        with a queue, the demand (arrival rate x service time) counts fully and the rest
        counts as the concurrency that drains it within backlog_drain_s. Without a
        queue, or before any service time is known, it is the measured concurrency.
        """
        if sample.service_s > 0:
            self._service_s = sample.service_s
        drain = self.config.backlog_drain_s
        if drain is None or sample.queued <= 0 or self._service_s <= 0:
            return sample.concurrency
        demand = sample.arrival_rate * self._service_s
        excess = max(0.0, sample.concurrency - demand)
        return min(sample.concurrency, demand + excess * min(1.0, self._service_s / drain))

    def decide(self, now: float, fleet: Fleet) -> Decision:
        c = self.config
        stable = self._stable.average(now)
        panic = self._panic.average(now)
        # Rates are relative to ready replicas; at zero, behave as if one (KPA does too)
        # so that the first request can scale straight to what it needs.
        ready = max(1, fleet.ready)
        max_up = math.ceil(c.max_scale_up_rate * ready)
        max_down = math.floor(ready / c.max_scale_down_rate)
        want_stable = math.ceil(_clean(stable) / c.target_concurrency)
        want_panic = math.ceil(_clean(panic) / c.target_concurrency)
        stable_n = int(clamp(want_stable, max_down, max_up))
        panic_n = int(clamp(want_panic, max_down, max_up))

        over = want_panic / ready >= c.panic_threshold
        if over:
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since > c.stable_window_s:
            # The burst has made it into the stable window: trust it again.
            self._panic_since, self._max_panic = None, 0

        desired, mode = stable_n, "stable"
        if self._panic_since is not None:
            # Never scale down while panicking: a burst that pauses for a few seconds
            # would otherwise shed the replicas it is about to need again.
            self._max_panic = max(self._max_panic, stable_n, panic_n)
            desired, mode = self._max_panic, "panic"

        if self._delay is not None:
            self._delay.record(now, desired)
            delayed = int(self._delay.current(now, desired))
            if delayed != desired:
                desired, mode = delayed, "delay"

        desired = int(clamp(desired, c.min_replicas, c.max_replicas))
        if desired > 0 or self._last_nonzero is None:
            # The first decision counts as activity: a fresh policy has no history and
            # must not take down the replicas it finds before the grace period.
            self._last_nonzero = now
        if desired == 0 and fleet.serving > 0 and now - self._last_nonzero < c.scale_to_zero_grace_s:
            desired, mode = 1, "grace"
        if fleet.serving == 0 and desired > 0:
            mode = "activate"
        return Decision(serving=desired, standby=self._standby(now, fleet, desired), mode=mode)

    def standby_step(self, now: float) -> int:
        """The largest scale step remembered (within standby_decay_s), 0 without one."""
        return int(self._steps.current(now, 0))

    def _standby(self, now: float, fleet: Fleet, desired: int) -> int:
        """Warm replicas to keep: the recent scale step, within [min_standby, standby].

        A step is remembered when a decision scales up from a serving fleet whose ready
        slots the load has outrun over the panic window (requests wait for the new
        replicas): its size is what the burst waits for, desired - ready. Steps the ready
        replicas absorb (1 -> 2 on a ramp, with free slots left) would gain nothing from
        standby and are not remembered; neither is activation from zero, which says that
        a request came, not how big a burst is. See docs/SCALER.md, "Standby replicas".
        """
        c = self.config
        if desired > fleet.serving > 0 and self._load.average(now) > self._slots.average(now):
            self._steps.record(now, desired - fleet.ready)
        if desired == 0:
            # Standby counts toward scale to zero: only the floor stays warm.
            return c.min_standby
        return max(c.min_standby, min(c.standby, self.standby_step(now)))


def _clean(x: float) -> float:
    # Running sums leave 1e-15 residues; they must not round up to one more replica.
    return 0.0 if x < 1e-9 else round(x, 9)
