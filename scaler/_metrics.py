"""The proxy's Prometheus metrics through prometheus_client: a collector that turns the
values the shell gathered at one instant (a `Snapshot`, `ConnectionStats`) into metric
families, rendered by `generate_latest`; and reading one sample back from a text
exposition with prometheus_client's parser (for the KEDA shell). Pure: values in, text out,
and the reverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from ._errors import MetricsError

#: The Content-Type that goes with `render`'s text.
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The signal and the policy's state, gathered by the controller at one instant."""

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
    #: Replica starts so far: (kind, stage, count, sum of seconds), and the newest start's
    #: stages (kind, stage, seconds) (`_starts.py`).
    start_sums: tuple[tuple[str, str, int, float], ...] = ()
    last_start: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True, kw_only=True)
class ConnectionStats:
    """The proxy's client connections (`QueueProxy.statistics()`)."""

    #: Holding a connection slot (idle ones included).
    open: int
    #: Of those, the ones without a whole request head yet (idle, or the head arriving).
    awaiting_head: int
    #: Accepted, waiting for a slot.
    waiting: int
    #: Closing gracefully after an error answer (no slot held).
    closing: int
    #: Answered 503 because no slot came free within queue_timeout_s.
    rejected: int
    #: Requests refused by status: 400 broken, 408 too slow, 413 body, 431 head too large.
    client_errors: tuple[tuple[int, int], ...] = ()


def families(s: Snapshot, c: ConnectionStats | None = None) -> Iterator[Metric]:
    def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_, value=value)

    def labelled(family: GaugeMetricFamily | CounterMetricFamily,
                 values: dict[str, float]) -> GaugeMetricFamily | CounterMetricFamily:
        for label, value in values.items():
            family.add_metric([label], value)
        return family

    yield gauge("scaler_concurrency",
                "Requests in flight at replicas plus requests queued in the proxy.",
                s.in_flight + s.queued)
    yield gauge("scaler_in_flight", "Requests in flight at replicas.", s.in_flight)
    yield gauge("scaler_queue_length", "Requests waiting in the proxy's queue.", s.queued)
    yield labelled(GaugeMetricFamily(
        "scaler_concurrency_average",
        "Concurrency averaged over the policy's windows (backlog-discounted).",
        labels=["window"]), {"stable": s.stable_concurrency, "panic": s.panic_concurrency})
    yield gauge("scaler_panic", "1 while the policy is in panic mode.", int(s.panicking))
    yield labelled(GaugeMetricFamily("scaler_replicas", "Replicas by state.", labels=["state"]),
                   {"ready": s.ready, "starting": s.starting, "standby": s.standby})
    yield gauge("scaler_desired_replicas", "Serving replicas the policy wants.", s.desired)
    yield labelled(CounterMetricFamily("scaler_requests", "Requests by outcome.",
                                       labels=["outcome"]),
                   {"accepted": s.accepted, "served": s.served,
                    "rejected_queue_full": s.rejected_full,
                    "rejected_queue_timeout": s.rejected_timeout, "failed": s.failed})
    yield CounterMetricFamily("scaler_retries",
                              "Requests sent again after a replica died before answering.",
                              value=s.retries)
    yield SummaryMetricFamily("scaler_queue_delay_seconds",
                              "Seconds requests waited for a replica slot.",
                              count_value=s.queue_delay_count, sum_value=s.queue_delay_sum_s)
    stages = SummaryMetricFamily("scaler_replica_start_seconds",
                                 "Seconds of each stage of replica starts (kind: cold or "
                                 "promotion), counted when a start got its first answer.",
                                 labels=["kind", "stage"])
    for kind, stage, n, total in s.start_sums:
        stages.add_metric([kind, stage], count_value=n, sum_value=total)
    yield stages
    last = GaugeMetricFamily("scaler_replica_last_start_seconds",
                             "Seconds of each stage of the newest replica start.",
                             labels=["kind", "stage"])
    for kind, stage, v in s.last_start:
        last.add_metric([kind, stage], v)
    yield last
    if c is None:
        return
    yield labelled(GaugeMetricFamily("scaler_connections", "Client connections by state.",
                                     labels=["state"]),
                   {"open": c.open, "awaiting_head": c.awaiting_head, "waiting": c.waiting,
                    "closing": c.closing})
    yield CounterMetricFamily("scaler_connections_rejected",
                              "Connections answered 503: no connection slot in time.",
                              value=c.rejected)
    yield labelled(CounterMetricFamily("scaler_client_errors",
                                       "Requests refused for the client's fault, by status.",
                                       labels=["status"]),
                   {str(status): n for status, n in c.client_errors})


class ProxyCollector(Collector):
    """Collects from the shell's callables on every scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot],
                 connections: Callable[[], ConnectionStats] | None = None) -> None:
        self._snapshot, self._connections = snapshot, connections

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot(), self._connections() if self._connections else None)


def registry(snapshot: Callable[[], Snapshot],
             connections: Callable[[], ConnectionStats] | None = None) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one): each proxy, and each
    test, exposes only its own values."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ProxyCollector(snapshot, connections))
    return reg


def render(s: Snapshot, c: ConnectionStats | None = None) -> str:
    return generate_latest(registry(lambda: s, (lambda: c) if c else None)).decode()


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition, keyed by (sample name, labels)."""
    try:
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise MetricsError(f"not a Prometheus text exposition: {exc}") from exc


def value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value; MetricsError if absent."""
    key = (name, frozenset((labels or {}).items()))
    samples = parse(text)
    if key not in samples:
        raise MetricsError(f"metric {name}{labels or ''} not found")
    return samples[key]
