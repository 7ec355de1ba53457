"""Prometheus text exposition: rendering the proxy's signal and parsing it back (for
the KEDA shell). Pure: plain values in, text out, and the reverse."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ._errors import MetricsError


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything /metrics shows, gathered by the shell at one instant."""

    in_flight: int
    queued: int
    ready: int
    starting: int
    standby: int
    desired: int
    stable_concurrency: float
    panic_concurrency: float
    panicking: bool
    accepted: int
    served: int
    rejected_full: int
    rejected_timeout: int
    failed: int
    retries: int
    queue_delay_sum_s: float
    queue_delay_count: int


def render(s: Snapshot) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {_fmt(value)}")

    metric("scaler_concurrency", "gauge",
           "Requests in flight at replicas plus requests queued in the proxy.",
           [("", s.in_flight + s.queued)])
    metric("scaler_in_flight", "gauge", "Requests in flight at replicas.", [("", s.in_flight)])
    metric("scaler_queue_length", "gauge", "Requests waiting in the proxy's queue.",
           [("", s.queued)])
    metric("scaler_concurrency_average", "gauge",
           "Concurrency averaged over the policy's windows (backlog-discounted).",
           [('{window="stable"}', s.stable_concurrency), ('{window="panic"}', s.panic_concurrency)])
    metric("scaler_panic", "gauge", "1 while the policy is in panic mode.",
           [("", int(s.panicking))])
    metric("scaler_replicas", "gauge", "Replicas by state.",
           [('{state="ready"}', s.ready), ('{state="starting"}', s.starting),
            ('{state="standby"}', s.standby)])
    metric("scaler_desired_replicas", "gauge", "Serving replicas the policy wants.",
           [("", s.desired)])
    metric("scaler_requests_total", "counter", "Requests by outcome.",
           [('{outcome="accepted"}', s.accepted), ('{outcome="served"}', s.served),
            ('{outcome="rejected_queue_full"}', s.rejected_full),
            ('{outcome="rejected_queue_timeout"}', s.rejected_timeout),
            ('{outcome="failed"}', s.failed)])
    metric("scaler_retries_total", "counter",
           "Requests sent again after a replica died before answering.", [("", s.retries)])
    metric("scaler_queue_delay_seconds", "summary", "Seconds requests waited for a replica slot.",
           [("_sum", s.queue_delay_sum_s), ("_count", s.queue_delay_count)])
    return "\n".join(out) + "\n"


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition, keyed by (name, labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise MetricsError(f"line {lineno}: not a Prometheus sample: {line[:80]!r}")
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError as exc:
            raise MetricsError(f"line {lineno}: bad value {m.group(3)!r}") from exc
    return out


def value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value; MetricsError if absent."""
    key = (name, frozenset((labels or {}).items()))
    samples = parse(text)
    if key not in samples:
        raise MetricsError(f"metric {name}{labels or ''} not found")
    return samples[key]
