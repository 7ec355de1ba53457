"""The anchors, as pure policies with the same interface as ours (`Policy`): Knative's KPA,
the Kubernetes HPA on a utilization metric, and Ray Serve's default policy.

Each follows its project's documented algorithm and defaults; the sources and the few
modelling choices (what "utilization" is for the HPA, which knob receives the common
per-replica target) are in docs/SCALER.md, "Baselines".
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ._policy import Decision, Fleet, Sample, clamp
from ._window import WindowAverage, WindowMax


# --------------------------------------------------------------------------- Knative KPA

@dataclass(frozen=True, kw_only=True)
class KpaConfig:
    """Knative Serving `config-autoscaler` defaults."""

    #: Per-revision concurrency target (annotation autoscaling.knative.dev/target;
    #: the cluster default container-concurrency-target-default is 100).
    target: float = 100.0
    #: container-concurrency-target-percentage: the fraction of the target aimed at.
    target_utilization: float = 0.70
    stable_window_s: float = 60.0
    #: panic-window-percentage 10% of the stable window.
    panic_window_s: float = 6.0
    #: panic-threshold-percentage 200%.
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0
    scale_to_zero_grace_s: float = 30.0
    tick_s: float = 2.0
    #: min-scale 0 (enable-scale-to-zero true); max-scale 0 means unbounded (we cap it).
    min_replicas: int = 0
    max_replicas: int = 1000


class KpaPolicy:
    """Knative's KPA (`pkg/autoscaler/scaling/autoscaler.go`): desired = ceil(windowed
    concurrency / (target x target utilization)); panic when the panic window's count
    reaches panic_threshold x ready, and while panicking (until a whole stable window
    passes without crossing it) the running maximum, never a scale-down; rate limits
    relative to the ready pods (at least one); scale to zero after the grace period.
    Queued requests count as concurrency (the activator reports them)."""

    def __init__(self, config: KpaConfig) -> None:
        self.config = config
        self.tick_s = config.tick_s
        self.sample_s = 1.0
        self._target = config.target * config.target_utilization
        self._stable = WindowAverage(config.stable_window_s)
        self._panic = WindowAverage(config.panic_window_s)
        self._delay = WindowMax(config.scale_down_delay_s) if config.scale_down_delay_s else None
        self._panic_since: float | None = None  # last time over the panic threshold
        self._max_panic = 0
        self._last_nonzero: float | None = None

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def averages(self, now: float) -> tuple[float, float]:
        return self._stable.average(now), self._panic.average(now)

    def record(self, now: float, sample: Sample) -> None:
        self._stable.record(now, sample.concurrency)
        self._panic.record(now, sample.concurrency)

    def decide(self, now: float, fleet: Fleet) -> Decision:
        c = self.config
        stable, panic = self.averages(now)
        # Rates are relative to ready pods; at zero, behave as if one (Knative does too)
        # so that the first request can scale straight to what it needs.
        ready = max(1, fleet.ready)
        max_up = math.ceil(c.max_scale_up_rate * ready)
        max_down = math.floor(ready / c.max_scale_down_rate)
        want_stable = math.ceil(_clean(stable) / self._target)
        want_panic = math.ceil(_clean(panic) / self._target)
        stable_n = int(clamp(want_stable, max_down, max_up))
        panic_n = int(clamp(want_panic, max_down, max_up))
        if want_panic / ready >= c.panic_threshold:
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since > c.stable_window_s:
            self._panic_since, self._max_panic = None, 0
        desired, mode = stable_n, "stable"
        if self._panic_since is not None:
            self._max_panic = max(self._max_panic, stable_n, panic_n)
            desired, mode = self._max_panic, "panic"
        if self._delay is not None:
            self._delay.record(now, desired)
            delayed = int(self._delay.current(now, desired))
            if delayed != desired:
                desired, mode = delayed, "delay"
        desired = int(clamp(desired, c.min_replicas, c.max_replicas))
        if desired > 0 or self._last_nonzero is None:
            self._last_nonzero = now
        idle_s = now - self._last_nonzero
        if desired == 0 and fleet.serving > 0 and idle_s < c.scale_to_zero_grace_s:
            desired, mode = 1, "grace"
        if fleet.serving == 0 and desired > 0:
            mode = "activate"
        return Decision(serving=desired, mode=mode)


def kpa_policy(config: KpaConfig) -> KpaPolicy:
    return KpaPolicy(config)


def _clean(x: float) -> float:
    # Running sums leave 1e-15 residues; they must not round up to one more pod.
    return 0.0 if x < 1e-9 else round(x, 9)


# --------------------------------------------------------------------------- Kubernetes HPA

@dataclass(frozen=True, kw_only=True)
class HpaConfig:
    """autoscaling/v2 HorizontalPodAutoscaler with the default `behavior`."""

    #: Target average utilization of ready pods, as a fraction (averageUtilization / 100).
    target_utilization: float = 0.8
    #: --horizontal-pod-autoscaler-sync-period.
    sync_s: float = 15.0
    #: --horizontal-pod-autoscaler-tolerance.
    tolerance: float = 0.1
    #: metrics-server --metric-resolution: the utilization is an average over this.
    metric_window_s: float = 15.0
    #: behavior.scaleUp: no stabilization; max(100% or 4 pods) per 15 s.
    scale_up_stabilization_s: float = 0.0
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    scale_up_period_s: float = 15.0
    #: behavior.scaleDown: 300 s stabilization; 100% per 15 s.
    scale_down_stabilization_s: float = 300.0
    scale_down_percent: float = 100.0
    scale_down_period_s: float = 15.0
    #: minReplicas defaults to 1 (0 needs the HPAScaleToZero alpha gate).
    min_replicas: int = 1
    max_replicas: int = 1000


class HpaPolicy:
    """replica_calculator.go + normalizeDesiredReplicasWithBehaviors, for one resource
    metric whose utilization cannot exceed 100% (CPU or GPU busy time)."""

    def __init__(self, config: HpaConfig) -> None:
        self.config = config
        self.tick_s = config.sync_s
        self.sample_s = 1.0
        self._busy = WindowAverage(config.metric_window_s)
        self._capacity = WindowAverage(config.metric_window_s)
        self._spec: int | None = None  # the scale target's spec.replicas
        self._recommendations: deque[tuple[float, int]] = deque()
        self._events: deque[tuple[float, int]] = deque()  # (time, +added / -removed)

    def record(self, now: float, sample: Sample) -> None:
        self._busy.record(now, sample.busy)
        self._capacity.record(now, sample.capacity)

    def decide(self, now: float, fleet: Fleet) -> Decision:
        c = self.config
        if self._spec is None:
            self._spec = fleet.serving
        current = self._spec
        desired = self._replicas_from_metric(now, fleet, current)
        desired = int(clamp(desired, c.min_replicas, c.max_replicas))
        desired = self._stabilize(now, desired, current)
        desired = self._rate_limit(now, desired, current)
        if desired != current:
            self._events.append((now, desired - current))
        self._spec = desired
        return Decision(serving=desired, mode="hpa")

    def _replicas_from_metric(self, now: float, fleet: Fleet, current: int) -> int:
        c = self.config
        capacity = self._capacity.average(now)
        if fleet.ready == 0 or capacity <= 0:
            return current  # no metrics: the HPA skips this sync
        utilization = min(1.0, self._busy.average(now) / capacity)  # capped at 100%
        ratio = utilization / c.target_utilization
        ready = fleet.ready
        unready = max(0, current - ready)
        if ratio > 1.0 and unready > 0:
            # Scaling up with pods not yet ready: they count as 0% used, so the HPA does
            # not keep adding pods for load that the starting ones will take.
            ratio = utilization * ready / (c.target_utilization * (ready + unready))
            if abs(ratio - 1.0) <= c.tolerance or ratio < 1.0:
                return current
            return math.ceil(ratio * (ready + unready))
        if abs(ratio - 1.0) <= c.tolerance:
            return current
        return math.ceil(ratio * ready)

    def _stabilize(self, now: float, desired: int, current: int) -> int:
        c = self.config
        self._recommendations.append((now, desired))
        longest = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s)
        while self._recommendations and self._recommendations[0][0] < now - longest:
            self._recommendations.popleft()
        up, down = desired, desired
        for t, rec in self._recommendations:
            if t >= now - c.scale_up_stabilization_s:
                up = min(up, rec)
            if t >= now - c.scale_down_stabilization_s:
                down = max(down, rec)
        out = current
        if out < up:
            out = up
        if out > down:
            out = down
        return out

    def _rate_limit(self, now: float, desired: int, current: int) -> int:
        c = self.config
        horizon = now - max(c.scale_up_period_s, c.scale_down_period_s)
        while self._events and self._events[0][0] <= horizon:
            self._events.popleft()
        if desired > current:
            added = sum(d for t, d in self._events if d > 0 and t > now - c.scale_up_period_s)
            start = current - added
            limit = max(math.ceil(start * (1 + c.scale_up_percent / 100)), start + c.scale_up_pods)
            return min(desired, max(limit, current))
        if desired < current:
            removed = -sum(d for t, d in self._events if d < 0 and t > now - c.scale_down_period_s)
            start = current + removed
            limit = math.floor(start * (1 - c.scale_down_percent / 100))
            return max(desired, min(limit, current))
        return desired


# --------------------------------------------------------------------------- Ray Serve

@dataclass(frozen=True, kw_only=True)
class RayServeConfig:
    """ray.serve.config.AutoscalingConfig defaults, default policy
    (replica_queue_length_autoscaling_policy)."""

    target_ongoing_requests: float = 2.0
    min_replicas: int = 1
    max_replicas: int = 100
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    #: None: falls back to downscale_delay_s.
    downscale_to_zero_delay_s: float | None = None
    #: None means 1.0 (smoothing_factor).
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    #: How often replicas and handles push their metrics.
    metrics_interval_s: float = 10.0
    #: The controller averages ongoing requests over this.
    look_back_period_s: float = 30.0
    #: CONTROL_LOOP_INTERVAL_S: decision counters count these periods.
    control_loop_s: float = 0.1


class RayServePolicy:
    def __init__(self, config: RayServeConfig) -> None:
        self.config = config
        self.tick_s = config.control_loop_s
        self.sample_s = 1.0
        self._window = WindowAverage(config.look_back_period_s)
        self._next_push = 0.0
        self._reported = 0.0   # total ongoing requests, as last pushed
        self._instant = 0.0    # the newest sample, for the queued-at-zero fast path
        self._target: int | None = None
        self._counter = 0

    def record(self, now: float, sample: Sample) -> None:
        self._window.record(now, sample.concurrency)
        self._instant = sample.concurrency
        if now >= self._next_push:
            self._reported = self._window.average(now)
            self._next_push = now + self.config.metrics_interval_s

    def decide(self, now: float, fleet: Fleet) -> Decision:
        c = self.config
        if self._target is None:
            self._target = fleet.serving
        running = fleet.ready
        if running == 0:
            # Cold start fast path: requests waiting at zero bypass the delays.
            if self._instant > 0 or self._reported > 0:
                self._target = max(math.ceil(1 * c.upscaling_factor), self._target)
            return Decision(serving=self._target, mode="ray")
        desired_f = self._reported / c.target_ongoing_requests
        delta = desired_f - running
        factor = c.upscaling_factor if delta > 0 else c.downscaling_factor
        scaled = math.ceil(running + factor * delta)
        if math.ceil(desired_f) < running and scaled == running:
            scaled -= 1
        bounded = int(clamp(scaled, c.min_replicas, c.max_replicas))
        self._target = self._apply_delay(bounded, self._target)
        return Decision(serving=self._target, mode="ray")

    def _apply_delay(self, desired: int, target: int) -> int:
        c = self.config
        decision = target
        if desired > target:
            self._counter = max(self._counter, 0) + 1
            if self._counter > int(c.upscale_delay_s / c.control_loop_s):
                self._counter, decision = 0, desired
        elif desired < target:
            self._counter = min(self._counter, 0) - 1
            to_zero = target == 1
            delay = c.downscale_delay_s
            if to_zero and c.downscale_to_zero_delay_s is not None:
                delay = c.downscale_to_zero_delay_s
            if not to_zero:
                desired = max(1, desired)
            if self._counter < -int(delay / c.control_loop_s):
                self._counter, decision = 0, desired
        else:
            self._counter = 0
        return decision
