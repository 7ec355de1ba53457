"""The concurrency policy: a pure decision function over load samples.

Inputs are plain data (`Sample`, `Fleet`) and `now`; the output is a `Decision` (serving
and standby replica counts). The simulator and the proxy's controller both drive it, so
what is tested here is what runs. The reasons and measurements behind every rule and
default are in docs/SCALER.md, "Policy".

A decision is the largest of four wants, then limited:

    stable    ceil(stable-window demand / target)            (Knative's stable mode)
    panic     ceil(panic-window demand / target), once that is panic_threshold x ready
    burst     while requests wait: the replicas that serve the arrival rate at the target
              and drain the backlog forecast for when new replicas can be ready, within
              backlog_drain_s (`ConcurrencyPolicy.burst_need`)
    headroom  slots for X x the stable demand, X the height of the recent bursts (demand
              while requests waited over the demand before) or base_headroom if more, up
              to burst_headroom, for burst_memory_s

Demand is the concurrency without the queue's wait: a queued request counts as the work
the arrival rate brings (rate x service time), not as the time it waits. Scale-down is at
most a halving per decision, never below the ready replicas while requests wait, never
cancels an order while the queue still grows or before the want has been lower for
order_hold_s, and keeps no order for a burst that is over (`_hold_orders`); the last
replica goes after the grace period and a keep-alive that grows with the arrival rate
(`keepalive_s`). Standby replicas (off by default) follow the recent scale step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from ._config import PolicyConfig
from ._window import WindowAverage, WindowMax, WindowRatio


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
    #: Requests completed in the period (the weight of `service_s`; 0: unknown, weight 1).
    completed: float = 0.0


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
    #: Why, for logs and tests: "stable", "panic", "burst", "headroom", "keep-alive", ...
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


class Lead:
    """Seconds from asking for a replica to its being ready, learned from the fleet.

    Orders are kept oldest first; a rise of the ready count settles the oldest ones (each
    settled order is a measurement, averaged over the last few), a decision that lowers
    the serving count while replicas start cancels the newest (the actuator removes the
    least advanced first). Until a measurement exists the prior is used.
    """

    def __init__(self, prior_s: float) -> None:
        self.seconds = prior_s
        self._orders: deque[float] = deque()
        self._measured = 0

    def ordered(self, now: float, count: int) -> None:
        self._orders.extend([now] * count)

    def cancelled(self, count: int) -> None:
        for _ in range(min(count, len(self._orders))):
            self._orders.pop()

    def arrived(self, now: float, count: int) -> None:
        for _ in range(min(count, len(self._orders))):
            self._measured += 1
            self.seconds += (now - self._orders.popleft() - self.seconds) / min(self._measured, 8)

    def remaining(self, now: float) -> float | None:
        """Seconds until the oldest outstanding order is expected ready (None: none)."""
        return max(0.0, self.seconds - (now - self._orders[0])) if self._orders else None


class ConcurrencyPolicy:
    """Knative's stable and panic modes plus a backlog forecast, burst headroom and a
    keep-alive; see the module docstring and docs/SCALER.md, "Policy"."""

    def __init__(self, config: PolicyConfig) -> None:
        c = self.config = config
        self.tick_s, self.sample_s = c.tick_s, c.sample_s
        self._stable = WindowAverage(c.stable_window_s)
        self._panic = WindowAverage(c.panic_window_s)
        self._rate = WindowAverage(c.rate_window_s)         # arrivals, for the forecast
        self._rate_stable = WindowAverage(c.stable_window_s)  # arrivals, for the keep-alive
        self._service = WindowRatio(c.stable_window_s)
        self._delay = WindowMax(c.scale_down_delay_s) if c.scale_down_delay_s else None
        self._heights = WindowMax(c.burst_memory_s)   # burst peak / pre-burst demand
        self._steps = WindowMax(c.standby_decay_s)    # standby: scale steps that waited
        self._load = WindowAverage(c.panic_window_s)  # standby: load vs ready slots
        self._slots = WindowAverage(c.panic_window_s)
        hold = c.order_hold_s or c.tick_s
        self._wanted = WindowMax(hold)      # the count wanted, for holding orders
        self._wanted_now = WindowMax(hold)  # ... without the stable window's memory
        self.lead = Lead(c.cold_start_s)
        self._queued = 0.0
        self._capacity = 0.0
        self._per_replica = 0.0       # slots per replica, learned from capacity / ready
        self._active_rate = 0.0       # stable-window arrivals / s when requests last came
        self._last_busy: float | None = None
        self._last_nonzero: float | None = None
        self._prev_ready: int | None = None
        self._pre_burst = 0.0         # stable demand before the current burst
        self._panic_at, self._panic_n = -math.inf, 0  # last panic crossing and its count
        self.mode = "stable"

    # ------------------------------------------------------------------ inputs
    @property
    def panicking(self) -> bool:
        return self.mode in ("panic", "burst")

    def averages(self, now: float) -> tuple[float, float]:
        """(stable, panic) window averages of the demand."""
        return self._stable.average(now), self._panic.average(now)

    def service_s(self, now: float) -> float:
        """Mean service time of the requests completed in the stable window (0: none yet)."""
        return self._service.value(now)

    def record(self, now: float, sample: Sample) -> None:
        if sample.service_s > 0:
            n = sample.completed or 1.0
            self._service.record(now, sample.service_s * n, n)
        value = self.demand(now, sample)
        self._stable.record(now, value)
        self._panic.record(now, value)
        self._rate.record(now, sample.arrival_rate)
        self._rate_stable.record(now, sample.arrival_rate)
        self._load.record(now, sample.concurrency)
        self._slots.record(now, sample.capacity)
        self._queued, self._capacity = sample.queued, sample.capacity
        if sample.arrival_rate > 0:
            # Requests over the window's length (not per sample: a lone request just after
            # start must not read as a busy service).
            arrived = self._rate_stable.total(now) * self.sample_s
            self._active_rate = arrived / self.config.stable_window_s
        if sample.concurrency > 0:
            self._last_busy = now

    def demand(self, now: float, sample: Sample) -> float:
        """The sample's concurrency without the queue's wait.

        While requests queue because slots are short, concurrency grows with the wait,
        not with demand (Little's law: arrival rate x (service + wait)). So in a sample
        with a queue the demand is the work arriving, rate x mean service time, or the
        requests in flight if more, never more than the measured concurrency. The backlog
        itself is the burst want's business. Without a queue, or before any service time
        is known, it is the measured concurrency.
        """
        svc = self.service_s(now)
        if sample.queued <= 0 or svc <= 0:
            return sample.concurrency
        in_flight = sample.concurrency - sample.queued
        return min(sample.concurrency, max(in_flight, sample.arrival_rate * svc))

    def slots_per_replica(self) -> float:
        """Request slots of one ready replica: measured, else twice the target."""
        return self._per_replica or 2 * self.config.target_concurrency

    def keepalive_s(self) -> float:
        """Seconds the last replica stays after requests stop (beyond the grace period).

        Dropping it is worth its cost only if the idle spell outlasts what a wake-up
        costs: a cold start (the lead, paid in replica-seconds) plus the wait of the
        requests that arrive meanwhile (rate x lead requests waiting lead/2 on average),
        priced at wait_cost replica-seconds per request-second. Keeping the replica that
        long (the ski-rental rule) costs at most twice the better choice in hindsight.
        """
        c, lead = self.config, self.lead.seconds
        return min(c.max_keepalive_s, lead + c.wait_cost * self._active_rate * lead * lead / 2)

    # ------------------------------------------------------------------ decision
    def decide(self, now: float, fleet: Fleet) -> Decision:
        c = self.config
        if self._prev_ready is not None and fleet.ready > self._prev_ready:
            self.lead.arrived(now, fleet.ready - self._prev_ready)
        self._prev_ready = fleet.ready
        if fleet.ready > 0 and self._capacity > 0:
            self._per_replica = max(self._per_replica, self._capacity / fleet.ready)
        slots = self.slots_per_replica()
        ready = max(1, fleet.ready)  # rates are relative to ready replicas, at least one
        stable, panic = self.averages(now)
        want_stable = math.ceil(_clean(stable) / c.target_concurrency)
        want_panic = math.ceil(_clean(panic) / c.target_concurrency)
        if self.mode not in ("burst", "panic"):
            self._pre_burst = stable

        desired, mode = want_stable, "stable"
        need, growing = self.burst_need(now, fleet)
        over = want_panic >= c.panic_threshold * ready
        if need > 0 or (over and growing is not None):
            desired, mode = max(want_stable, want_panic, need), "burst"
            if self._pre_burst > 0:
                height = self._rate.average(now) * self.service_s(now) / self._pre_burst
                self._heights.record(now, height)
            if growing:
                # The queue still grows: a replica cancelled now would be asked for again
                # a moment later and start its whole cold start over.
                desired = max(desired, fleet.serving)
        elif over or now - self._panic_at < c.panic_window_s:
            # Held for a panic window after the last crossing: the count is computed over
            # that window, and a decision that flips back a tick later only churns orders.
            if over:
                self._panic_at, self._panic_n = now, max(want_stable, want_panic)
            desired, mode = max(want_stable, want_panic, self._panic_n), "panic"
        elif self._queued > 0:
            desired = max(desired, fleet.ready)  # requests wait: keep what serves them
        if mode == "stable" and desired < fleet.serving:
            desired = max(desired, math.floor(ready / c.max_scale_down_rate))
        desired = min(desired, math.ceil(c.max_scale_up_rate * ready))

        headroom = self.headroom(now, stable)
        desired = self._hold_orders(now, fleet, desired, max(want_panic, need, headroom),
                                    bool(growing))
        if headroom > desired:
            desired, mode = headroom, "headroom"
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
        if desired == 0 and fleet.serving > 0:
            if now - self._last_nonzero < c.scale_to_zero_grace_s:
                desired, mode = 1, "grace"
            elif self._last_busy is not None and now - self._last_busy < self.keepalive_s():
                desired, mode = 1, "keep-alive"
        if fleet.serving == 0 and desired > 0:
            mode = "activate"
        if desired > fleet.serving:
            self.lead.ordered(now, desired - fleet.serving)
        elif desired < fleet.serving and fleet.starting:
            self.lead.cancelled(min(fleet.starting, fleet.serving - desired))
        self.mode = mode
        return Decision(serving=desired, standby=self._standby(now, fleet, desired), mode=mode)

    def _hold_orders(self, now: float, fleet: Fleet, desired: int, wanted_now: int,
                     growing: bool) -> int:
        """The count for replicas still starting: no flip-flop, no orders for a past burst.

        A starting replica is cancelled only once the count that wants it has been lower
        for order_hold_s: the noise of a panic window or a 2 s arrival rate otherwise
        cancels an order and places it again a moment later, and the new one starts its
        cold start over. And, unless the queue still grows, it is kept only for what is
        wanted now (the panic window's count, the forecast, the headroom, each over the
        same order_hold_s), not for a stable window that still remembers a burst that is
        over: it would arrive to serve nothing.
        """
        if self.config.order_hold_s <= 0:
            return desired
        self._wanted.record(now, desired)
        self._wanted_now.record(now, wanted_now)
        if not fleet.starting:
            return desired
        if desired < fleet.serving:
            desired = max(desired, min(fleet.serving, int(self._wanted.current(now, desired))))
        if desired > fleet.ready and not growing:
            desired = min(desired, max(fleet.ready, int(self._wanted_now.current(now, wanted_now))))
        return desired

    def burst_need(self, now: float, fleet: Fleet) -> tuple[int, bool | None]:
        """(replicas, queue growing) while requests wait or arrive faster than the ready
        slots serve them; (0, None) otherwise.

        The backlog is forecast for when new capacity can come: the replicas already
        starting (the oldest order's remaining lead) and, past them, one asked for now
        (the whole lead). The want serves the arrival rate at the target and drains that
        backlog within backlog_drain_s once the replicas are ready: replicas asked for
        together are ready together, so the first order is sized for the backlog they
        will find, not the one there is now.
        """
        c = self.config
        svc = self.service_s(now)
        if c.backlog_drain_s is None or svc <= 0:
            return 0, None
        rate, queued = self._rate.average(now), self._queued
        slots = self.slots_per_replica()
        if queued <= 0 and rate * svc <= fleet.ready * slots:
            return 0, None
        served = fleet.ready * slots / svc            # requests/s the ready slots finish
        lead, remaining = self.lead.seconds, self.lead.remaining(now)
        if fleet.starting > 0 and remaining is not None:
            first = max(0.0, queued + (rate - served) * remaining)
            served_later = (fleet.ready + fleet.starting) * slots / svc
            after = (rate - served_later) * max(0.0, lead - remaining)
            later = max(0.0, first + after)
        else:
            first = 0.0
            later = max(0.0, queued + (rate - served) * lead)
        base = rate * svc / c.target_concurrency
        drain = svc / (c.backlog_drain_s * slots)     # replicas per request of backlog
        need = max(math.ceil(_clean(base + first * drain)) if first > 0 else 0,
                   math.ceil(_clean(base + later * drain)) if later > 0 else 0)
        return need, rate > served

    def headroom(self, now: float, stable: float) -> int:
        """Replicas whose slots hold X x the stable demand, X the tallest burst (peak over
        pre-burst demand) of the last burst_memory_s or base_headroom if more, at most
        burst_headroom. base_headroom covers the first burst, which finds no height
        remembered, and keeps Knative's standing slack (its 70% target) between bursts."""
        c = self.config
        height = max(self._heights.current(now, 0.0), c.base_headroom)
        if height <= 0 or stable <= 0 or c.burst_headroom <= 0:
            return 0
        return math.ceil(_clean(min(c.burst_headroom, height) * stable / self.slots_per_replica()))

    # ------------------------------------------------------------------ standby
    def standby_step(self, now: float) -> int:
        """The largest scale step remembered (within standby_decay_s), 0 without one."""
        return int(self._steps.current(now, 0))

    def _standby(self, now: float, fleet: Fleet, desired: int) -> int:
        """Warm replicas to keep: the recent scale step, within [min_standby, standby].

        A step is remembered when a decision scales up from a serving fleet whose ready
        slots the load has outrun over the panic window (requests wait for the new
        replicas): its size is what the burst waits for, desired - ready. Off by default
        (standby 0): in the simulator a standby replica costs what a serving one does and
        serves nothing until promoted (docs/SCALER.md, "Standby replicas").
        """
        c = self.config
        if desired > fleet.serving > 0 and self._load.average(now) > self._slots.average(now):
            self._steps.record(now, desired - fleet.ready)
        if desired == 0:
            return c.min_standby  # standby counts toward scale to zero: only the floor stays
        return max(c.min_standby, min(c.standby, self.standby_step(now)))


def _clean(x: float) -> float:
    # Running sums leave 1e-15 residues; they must not round up to one more replica.
    return 0.0 if x < 1e-9 else round(x, 9)
