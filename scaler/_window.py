"""Time windows over samples: the average (stable and panic concurrency), the maximum
(scale-down delay, burst memory, HPA stabilization) and the weighted mean (service time).
Pure: callers pass `now`; nothing reads a clock."""

from __future__ import annotations

from collections import deque


class WindowAverage:
    """Mean of the samples recorded in (now - window_s, now].

    Samples are expected at a fixed period, zeros included (the samplers here always
    record one), so the mean equals Knative's bucket average with empty buckets as zero.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def record(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        self._sum += value
        self._prune(now)

    def average(self, now: float) -> float:
        self._prune(now)
        if not self._samples:
            return 0.0
        # Re-summing keeps float drift from the running sum out of exact zero checks.
        if len(self._samples) <= 64:
            self._sum = sum(v for _, v in self._samples)
        return max(0.0, self._sum / len(self._samples))

    def total(self, now: float) -> float:
        """Sum of the samples in the window (a count when they are per-period counts)."""
        self._prune(now)
        return max(0.0, sum(v for _, v in self._samples))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._sum -= self._samples.popleft()[1]


class WindowMax:
    """Largest value recorded in (now - window_s, now]; a monotone deque keeps it O(1)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()

    def record(self, now: float, value: float) -> None:
        while self._q and self._q[-1][1] <= value:
            self._q.pop()
        self._q.append((now, value))

    def current(self, now: float, default: float = 0.0) -> float:
        horizon = now - self.window_s
        while self._q and self._q[0][0] <= horizon:
            self._q.popleft()
        return self._q[0][1] if self._q else default


class WindowRatio:
    """Sum of numerators over sum of denominators of the samples in (now - window_s, now]:
    a weighted mean (seconds of service per completed request). When the window holds no
    weight it answers the last mean it had, so an idle spell does not forget it."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float, float]] = deque()
        self._num = self._den = 0.0
        self._last = 0.0

    def record(self, now: float, num: float, den: float) -> None:
        if den <= 0:
            return
        self._samples.append((now, num, den))
        self._num += num
        self._den += den
        self._prune(now)
        self._last = self._num / self._den

    def value(self, now: float) -> float:
        self._prune(now)
        if self._den > 1e-9:
            self._last = self._num / self._den
        return self._last

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] <= horizon:
            _, n, d = self._samples.popleft()
            self._num -= n
            self._den -= d
        if not self._samples:
            self._num = self._den = 0.0
