"""Request traces: reading (our CSV, Azure Functions 2019) and generating (bursty, diurnal).

A trace is two equal-length float lists, arrival times (sorted, seconds from 0) and
service times (seconds a replica slot is busy with the request). Generators are seeded
and deterministic; their shapes are documented in docs/SCALER.md, "Traces".
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ._errors import TraceError


@dataclass(frozen=True)
class Trace:
    arrivals: list[float]
    service: list[float]

    def __post_init__(self) -> None:
        if len(self.arrivals) != len(self.service):
            raise TraceError("arrivals and service times differ in length")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration_s(self) -> float:
        return self.arrivals[-1] if self.arrivals else 0.0


def _open_text(path: Path) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def load_csv(path: Path) -> Trace:
    """Our format: header `arrival_s,service_s`, one request a row (.gz allowed)."""
    rows: list[tuple[float, float]] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:2] != ["arrival_s", "service_s"]:
                raise TraceError(f"{path}: header must be arrival_s,service_s, got {header}")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    a, s = float(row[0]), float(row[1])
                except (ValueError, IndexError) as exc:
                    raise TraceError(f"{path}:{lineno}: bad row {row!r}") from exc
                if not (a >= 0 and s >= 0 and math.isfinite(a) and math.isfinite(s)):
                    raise TraceError(f"{path}:{lineno}: negative or non-finite value")
                rows.append((a, s))
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc}") from exc
    rows.sort(key=lambda r: r[0])
    return Trace([r[0] for r in rows], [r[1] for r in rows])


def write_csv(trace: Trace, path: Path) -> None:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:  # type: ignore[operator]
        f.write("arrival_s,service_s\n")
        for a, s in zip(trace.arrivals, trace.service):
            f.write(f"{a:.4f},{s:.4f}\n")


def load_azure(path: Path, *, function: str | None = None, service_s: float = 0.5,
               durations: Path | None = None, seed: int = 0, minutes: int | None = None) -> Trace:
    """Azure Functions 2019 `invocations_per_function_md.anon.dNN.csv`: columns HashOwner,
    HashApp, HashFunction, Trigger, then 1..1440 (invocations per minute).

    `function` picks rows whose HashFunction starts with it (None: all rows summed). Each
    minute's count becomes that many arrivals spread uniformly at random in the minute
    (a Poisson process given its count). Service time: the function's Average (ms) from a
    `function_durations_percentiles` file when given, else `service_s`.
    """
    rng = random.Random(seed)
    per_minute: list[int] = []
    hashes: set[str] = set()
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            cols = [c for c in (reader.fieldnames or []) if c.isdigit()]
            if "HashFunction" not in (reader.fieldnames or []) or not cols:
                raise TraceError(f"{path}: not an Azure Functions invocations file")
            cols.sort(key=int)
            if minutes is not None:
                cols = cols[:minutes]
            per_minute = [0] * len(cols)
            for row in reader:
                if function is not None and not row["HashFunction"].startswith(function):
                    continue
                hashes.add(row["HashFunction"])
                for i, col in enumerate(cols):
                    per_minute[i] += int(float(row[col] or 0))
    except (OSError, ValueError, KeyError) as exc:
        raise TraceError(f"cannot read {path}: {exc}") from exc
    if not hashes:
        raise TraceError(f"{path}: no function matches {function!r}")
    svc = _azure_service_s(durations, hashes, service_s) if durations else service_s
    arrivals: list[float] = []
    for minute, count in enumerate(per_minute):
        arrivals.extend(sorted(60.0 * minute + 60.0 * rng.random() for _ in range(count)))
    return Trace(arrivals, [svc] * len(arrivals))


def _azure_service_s(path: Path, hashes: set[str], default: float) -> float:
    total = weight = 0.0
    try:
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                if row.get("HashFunction") in hashes:
                    n = float(row.get("Count") or 1)
                    total += float(row["Average"]) / 1000.0 * n
                    weight += n
    except (OSError, ValueError, KeyError) as exc:
        raise TraceError(f"cannot read {path}: {exc}") from exc
    return total / weight if weight else default


def load(path: Path, **azure: object) -> Trace:
    """Our CSV or the Azure format, told apart by the header."""
    with _open_text(path) as f:
        head = f.readline()
    if head.startswith("arrival_s"):
        return load_csv(path)
    if "HashFunction" in head:
        return load_azure(path, **azure)  # type: ignore[arg-type]
    raise TraceError(f"{path}: unknown trace format (header {head.strip()[:60]!r})")


# --------------------------------------------------------------------------- generators

def _service(rng: random.Random, mean_s: float, cv: float) -> float:
    # Gamma with the given mean and coefficient of variation: positive, right-skewed,
    # like model inference times.
    if cv <= 0:
        return mean_s
    k = 1.0 / (cv * cv)
    return rng.gammavariate(k, mean_s / k)


def _poisson(rng: random.Random, rate_at, duration_s: float, peak: float) -> list[float]:
    """Non-homogeneous Poisson arrivals by thinning (Lewis & Shedler)."""
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() * peak <= rate_at(t):
            out.append(t)


def bursty(*, duration_s: float = 3600.0, base_rps: float = 4.0, spike_factor: float = 10.0,
           spike_s: float = 90.0, spike_every_s: float = 600.0, service_mean_s: float = 0.5,
           service_cv: float = 0.5, seed: int = 1) -> Trace:
    """Poisson at `base_rps`, with spikes of `spike_factor` x base lasting `spike_s`; spike
    starts are `spike_every_s` apart on average (exponential gaps, at least spike_s)."""
    rng = random.Random(seed)
    spikes: list[tuple[float, float]] = []
    t = rng.uniform(0.3, 0.7) * spike_every_s
    while t < duration_s:
        spikes.append((t, t + spike_s))
        t += spike_s + max(spike_s, rng.expovariate(1.0 / spike_every_s))

    def rate(x: float) -> float:
        return base_rps * (spike_factor if any(a <= x < b for a, b in spikes) else 1.0)

    arrivals = _poisson(rng, rate, duration_s, base_rps * spike_factor)
    return Trace(arrivals, [_service(rng, service_mean_s, service_cv) for _ in arrivals])


def diurnal(*, duration_s: float = 86400.0, period_s: float = 86400.0, peak_rps: float = 6.0,
            trough_rps: float = 0.0, floor_rps: float = 0.002, service_mean_s: float = 0.5,
            service_cv: float = 0.5, seed: int = 2) -> Trace:
    """Rate follows a raised cosine from `trough_rps` (t=0, night) to `peak_rps` (half a
    period), squared so the night is long and quiet; never below `floor_rps`."""
    rng = random.Random(seed)

    def rate(x: float) -> float:
        phase = 0.5 - 0.5 * math.cos(2 * math.pi * x / period_s)
        return max(floor_rps, trough_rps + (peak_rps - trough_rps) * phase * phase)

    arrivals = _poisson(rng, rate, duration_s, max(peak_rps, floor_rps))
    return Trace(arrivals, [_service(rng, service_mean_s, service_cv) for _ in arrivals])
