"""A family of generated traces for judging policies on traffic they were not tuned for.

`generate(shape, seed)` turns a `Shape` (explicit parameters: the base rate and its slow
swing, burst height/width/gap ranges, ramps, silences, the service-time law) into a
`Trace`; `family(count, seed)` draws `count` shapes from documented ranges
(docs/SCALER.md, "Trace family"). Both are pure and deterministic: a seed in, the same
requests out, on every run (only `random.Random(seed)` is used).

The rate at time t is

    rate(t) = base(t) x ramp(t) x burst(t), or 0 inside a silence,

piecewise constant per second (the value at the middle of each second); arrivals are a
Poisson process of that rate. `base` swings slowly around `base_rps` (two sinusoids of
random phase, periods `base_period_s` and `base_period_s / e`); a ramp multiplies it up
to `ramp_factor` and back down; a burst multiplies it by its height for its width, with
a linear rise over `rise` of the width. Service times are drawn independently of
arrivals, clipped to `service_cap` x the mean.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ._errors import TraceError
from ._trace import Trace

SERVICE_LAWS = ("gamma", "lognormal", "pareto")


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The parameters of one generated trace (all drawn features come from the seed)."""

    duration_s: float = 3600.0
    #: Mean of the base rate (requests/s) and its relative swing: the base stays within
    #: base_rps x [1 - swing, 1 + swing].
    base_rps: float = 2.0
    base_swing: float = 0.3
    base_period_s: float = 3600.0
    #: Burst height (multiple of the base), width (s) and the gap between one burst's end
    #: and the next one's start: heights and widths log-uniform in their ranges, gaps
    #: exponential with this mean (at least `min_gap_s`). The first burst starts after an
    #: exponential gap as well.
    burst_height: tuple[float, float] = (3.0, 15.0)
    burst_width_s: tuple[float, float] = (20.0, 240.0)
    burst_gap_s: float = 900.0
    min_gap_s: float = 30.0
    #: Fraction of a burst's width spent rising linearly (0: a step).
    rise: float = 0.1
    #: Ramps: each raises the base by ramp_factor over ramp_s, holds for ramp_s, falls over
    #: ramp_s; placed uniformly at random.
    ramps: int = 0
    ramp_factor: float = 3.0
    ramp_s: float = 600.0
    #: Silences: zero rate for silence_s each, placed uniformly at random.
    silences: int = 0
    silence_s: float = 600.0
    #: Service-time law ("gamma", "lognormal", "pareto"), its mean, and its spread:
    #: gamma's coefficient of variation, lognormal's sigma, or Pareto's alpha (> 1).
    service: str = "gamma"
    service_mean_s: float = 0.5
    service_spread: float = 0.5
    #: Service times are clipped at this multiple of the mean (a bound on the tail).
    service_cap: float = 40.0

    def __post_init__(self) -> None:
        lo, hi = self.burst_height
        wlo, whi = self.burst_width_s
        if not (self.duration_s > 0 and self.base_rps > 0 and 0 <= self.base_swing < 1
                and self.base_period_s > 0):
            raise TraceError("need duration_s > 0, base_rps > 0, 0 <= base_swing < 1")
        if not (1 <= lo <= hi and 0 < wlo <= whi and self.burst_gap_s > 0
                and self.min_gap_s >= 0 and 0 <= self.rise <= 1):
            raise TraceError("bad burst parameters")
        if self.ramps < 0 or self.silences < 0 or self.ramp_factor < 1 or self.ramp_s <= 0 \
                or self.silence_s <= 0:
            raise TraceError("bad ramp or silence parameters")
        if self.service not in SERVICE_LAWS:
            raise TraceError(f"service law must be one of {SERVICE_LAWS}")
        if self.service_mean_s <= 0 or self.service_spread <= 0 or self.service_cap <= 1:
            raise TraceError("need service_mean_s > 0, service_spread > 0, service_cap > 1")
        if self.service == "pareto" and self.service_spread <= 1:
            raise TraceError("a Pareto service law needs alpha (service_spread) > 1")


@dataclass(frozen=True)
class Features:
    """What `generate` drew for one seed: (start, end, height) bursts, (start, end)
    ramps and silences, edges on whole seconds. Kept so tests and plots can check the
    trace against them."""

    bursts: list[tuple[float, float, float]] = field(default_factory=list)
    ramps: list[tuple[float, float]] = field(default_factory=list)
    silences: list[tuple[float, float]] = field(default_factory=list)


def features(shape: Shape, seed: int) -> Features:
    # Edges fall on whole seconds, where the piecewise-constant rate changes.
    rng = random.Random(f"features/{seed}")
    d = shape.duration_s
    bursts: list[tuple[float, float, float]] = []
    t = round(max(shape.min_gap_s, rng.expovariate(1.0 / shape.burst_gap_s)))
    while t < d:
        width = max(1, round(_log_uniform(rng, *shape.burst_width_s)))
        bursts.append((t, min(d, t + width), _log_uniform(rng, *shape.burst_height)))
        t += width + round(max(shape.min_gap_s, rng.expovariate(1.0 / shape.burst_gap_s)))
    span = 3 * shape.ramp_s
    ramps = [(s, s + span) for s in sorted(round(rng.uniform(0, max(0.0, d - span)))
                                          for _ in range(shape.ramps))]
    silences = [(s, s + round(shape.silence_s)) for s in sorted(
        round(rng.uniform(0, max(0.0, d - shape.silence_s))) for _ in range(shape.silences))]
    return Features(bursts, ramps, silences)


def rate_fn(shape: Shape, seed: int):
    """rate(t) in requests/s for the trace `generate(shape, seed)` draws from."""
    f = features(shape, seed)
    rng = random.Random(f"phase/{seed}")
    p1, p2 = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
    w1, w2 = 2 * math.pi / shape.base_period_s, 2 * math.pi * math.e / shape.base_period_s
    s, r = shape.base_swing, shape.ramp_s

    def ramp(t: float) -> float:
        m = 1.0
        for a, _ in f.ramps:
            x = (t - a) / r  # 0..1 up, 1..2 hold, 2..3 down
            level = x if 0 <= x < 1 else 1.0 if 1 <= x < 2 else 3 - x if 2 <= x < 3 else 0.0
            m = max(m, 1 + (shape.ramp_factor - 1) * level)
        return m

    def burst(t: float) -> float:
        for a, b, h in f.bursts:
            if a <= t < b:
                up = shape.rise * (b - a)
                return h if up <= 0 or t >= a + up else 1 + (h - 1) * (t - a) / up
        return 1.0

    def rate(t: float) -> float:
        if any(a <= t < b for a, b in f.silences):
            return 0.0
        swing = 0.6 * math.sin(w1 * t + p1) + 0.4 * math.sin(w2 * t + p2)
        return shape.base_rps * (1 + s * swing) * ramp(t) * burst(t)

    return rate


def generate(shape: Shape, seed: int) -> Trace:
    """The trace of `shape` for `seed`: Poisson arrivals of `rate_fn`, piecewise constant
    per second, and service times from the shape's law."""
    rate = rate_fn(shape, seed)
    rng = random.Random(f"arrivals/{seed}")
    arrivals: list[float] = []
    for sec in range(math.ceil(shape.duration_s)):
        lam = rate(sec + 0.5)
        if lam <= 0:
            continue
        t = sec + rng.expovariate(lam)
        while t < sec + 1 and t < shape.duration_s:
            arrivals.append(t)
            t += rng.expovariate(lam)
    srng = random.Random(f"service/{seed}")
    return Trace(arrivals, [_service(srng, shape) for _ in arrivals])


def _service(rng: random.Random, shape: Shape) -> float:
    m, k = shape.service_mean_s, shape.service_spread
    if shape.service == "gamma":
        a = 1.0 / (k * k)
        x = rng.gammavariate(a, m / a)
    elif shape.service == "lognormal":
        x = rng.lognormvariate(math.log(m) - k * k / 2, k)  # mean m
    else:
        x = m * (k - 1) / k * rng.paretovariate(k)  # scale so the mean is m
    return min(max(x, 1e-4), shape.service_cap * m)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))


# --------------------------------------------------------------------------- the family

@dataclass(frozen=True)
class Member:
    name: str
    shape: Shape
    seed: int

    def trace(self) -> Trace:
        return generate(self.shape, self.seed)


def draw_shape(rng: random.Random, service: str) -> Shape:
    """One shape from the family's ranges (docs/SCALER.md, "Trace family")."""
    mean_s = _log_uniform(rng, 0.2, 2.0)
    conc = _log_uniform(rng, 0.5, 8.0)  # base concurrency = rate x mean service time
    spread = {"gamma": rng.uniform(0.3, 1.0), "lognormal": rng.uniform(0.5, 1.3),
              "pareto": rng.uniform(1.5, 3.0)}[service]
    return Shape(
        duration_s=7200.0,
        base_rps=conc / mean_s, base_swing=rng.uniform(0.0, 0.6),
        base_period_s=_log_uniform(rng, 1200.0, 7200.0),
        burst_height=(3.0, 15.0), burst_width_s=(20.0, 240.0),
        burst_gap_s=_log_uniform(rng, 300.0, 1800.0), rise=rng.uniform(0.0, 0.3),
        ramps=rng.randint(0, 2), ramp_factor=rng.uniform(2.0, 5.0),
        ramp_s=_log_uniform(rng, 180.0, 900.0),
        silences=rng.randint(0, 2), silence_s=_log_uniform(rng, 300.0, 1500.0),
        service=service, service_mean_s=mean_s, service_spread=spread)


def family(count: int = 60, seed: int = 0) -> list[Member]:
    """`count` members: shapes drawn from the family's ranges with `seed`, service laws in
    turn (gamma, lognormal, Pareto), each member's trace seed derived from `seed`."""
    rng = random.Random(f"family/{seed}")
    out = []
    for i in range(count):
        shape = draw_shape(rng, SERVICE_LAWS[i % len(SERVICE_LAWS)])
        out.append(Member(f"s{seed}-{i:03d}", shape, rng.randrange(1 << 30)))
    return out
