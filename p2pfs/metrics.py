"""Counters and latency histograms of one daemon, as a status dict or Prometheus metrics.

Owned by the daemon and passed explicitly to the components that count things. Updates
happen on the trio thread (plain ints, `metrics.errors["eio"] += 1`, `.observe(s)`), so
counting needs no lock. Exposition is `prometheus_client`'s: `Metrics` is a custom
collector that turns a snapshot into metric families at scrape time, and `serve` answers
scrapes with the peer tier's small h11 server (p2pfs.peer._server, no chunk route) on the
trio thread too, so a scrape sees every counter between two updates, never mid-way.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import Counter
from typing import Any, AsyncIterator, Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

# Fetch latency buckets, seconds (upper bounds).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds a scraper has to send its request before its connection is dropped.
SCRAPE_TIMEOUT = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (None before any sample)."""
        if not self.n:
            return None
        rank, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")

    def family(self, name: str, help_: str) -> HistogramMetricFamily:
        counts = list(self.counts)  # one copy: the buckets and their count agree
        cum, buckets = 0, []
        for b, c in zip(self.buckets, counts):
            cum += c
            buckets.append((str(b), cum))
        buckets.append(("+Inf", sum(counts)))
        return HistogramMetricFamily(name, help_, buckets=buckets, sum_value=self.total)


class Metrics:
    def __init__(self) -> None:
        self.hits = Counter()  # by tier: memory, disk
        self.misses = 0
        self.bytes_by_source = Counter()  # disk, origin (bytes as stored/transferred)
        self.errors = Counter()  # by kind
        self.fetch_latency = Histogram()
        self.read_latency = Histogram()
        self.reads = 0
        self.read_bytes = 0
        self.origin_requests = 0
        self.writeback_done = 0
        self.writeback_dropped = 0
        self.prefetched_chunks = 0
        self.fill_requests = 0  # control-socket `fill` requests answered (ok or not)
        self.fill_bytes = 0     # bytes written into clients' memory by `fill`
        self.local_opens = 0       # local copies handed out whole (`open`)
        self.local_open_bytes = 0  # their sizes
        self.peer_served_bytes = 0  # chunk bytes this node served to peers
        self.fuse_ops = Counter()   # FUSE requests answered, by operation (lookup, read, ...)
        # More metric families, collected at scrape time (the peer node adds its own).
        self.families: list[Callable[[], list[Metric]]] = []
        # Gauges read at collection time (set by the daemon).
        self.gauges: dict[str, Callable[[], float]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    @property
    def hit_ratio(self) -> float | None:
        hits = sum(dict(self.hits).values())
        total = hits + self.misses
        return hits / total if total else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "reads": self.reads,
            "read_bytes": self.read_bytes,
            "hits": dict(self.hits),
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
            "bytes_by_source": dict(self.bytes_by_source),
            "origin_requests": self.origin_requests,
            "fetch_latency_p50_s": self.fetch_latency.quantile(0.5),
            "fetch_latency_p99_s": self.fetch_latency.quantile(0.99),
            "read_latency_p50_s": self.read_latency.quantile(0.5),
            "read_latency_p99_s": self.read_latency.quantile(0.99),
            "errors": dict(self.errors),
            "writeback_done": self.writeback_done,
            "writeback_dropped": self.writeback_dropped,
            "prefetched_chunks": self.prefetched_chunks,
            "fill_requests": self.fill_requests,
            "fill_bytes": self.fill_bytes,
            "local_opens": self.local_opens,
            "local_open_bytes": self.local_open_bytes,
            "peer_served_bytes": self.peer_served_bytes,
            "fuse_ops": dict(self.fuse_ops),
            **{k: g() for k, g in dict(self.gauges).items()},
        }

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol (names: docs/FORMAT.md)."""
        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"p2pfs_{name}", help_, value=value)

        def by(name: str, help_: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
            fam = CounterMetricFamily(f"p2pfs_{name}", help_, labels=[label])
            for key, v in sorted(values.items()):
                fam.add_metric([key], v)
            return fam

        hits, by_source = dict(self.hits), dict(self.bytes_by_source)
        yield counter("reads", "FUSE read requests served.", self.reads)
        yield counter("read_bytes", "Bytes returned to readers.", self.read_bytes)
        yield by("chunk_hits", "Chunk lookups served from a cache tier.", "tier",
                 {t: hits.get(t, 0) for t in ("memory", "disk")})
        yield counter("chunk_misses", "Chunk lookups that memory and disk could not serve "
                      "(served by peers or the origin).", self.misses)
        yield by("bytes", "Chunk bytes loaded, by source (memory hits load nothing).", "source",
                 {s: by_source.get(s, 0) for s in ("memory", "disk", "peer", "origin")})
        yield counter("origin_requests", "Ranged GETs sent to the origin.", self.origin_requests)
        yield by("errors", "Errors, by kind.", "kind", dict(self.errors))
        yield counter("writeback", "Chunks written back to the disk cache.", self.writeback_done)
        yield counter("writeback_dropped", "Chunks not written back because the queue was full.",
                      self.writeback_dropped)
        yield counter("fill_requests",
                      "Control-socket fill requests (file ranges written into a client's memory).",
                      self.fill_requests)
        yield counter("fill_bytes", "Bytes written into clients' memory by fill.", self.fill_bytes)
        yield counter("local_opens", "Local copies of whole files handed to clients (open).",
                      self.local_opens)
        yield counter("local_open_bytes", "Bytes of the local copies handed out by open.",
                      self.local_open_bytes)
        yield counter("peer_served_bytes", "Chunk bytes served to peers.", self.peer_served_bytes)
        yield by("fuse_ops", "FUSE requests answered (with data or an error), by operation.",
                 "op", dict(self.fuse_ops))
        yield self.fetch_latency.family("p2pfs_fetch_seconds", "Latency of origin requests.")
        yield self.read_latency.family("p2pfs_read_seconds", "Latency of FUSE reads.")
        for name, g in sorted(dict(self.gauges).items()):
            yield GaugeMetricFamily(f"p2pfs_{name}", name.replace("_", " ") + ".", value=g())
        for families in list(self.families):
            yield from families()

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        return generate_latest(self.registry).decode()


@contextlib.asynccontextmanager
async def serve(metrics: Metrics, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Serve `metrics` over HTTP at host:port (GET /metrics, and /healthz) for the duration
    of the block; yields the address bound (port 0: a free one).

    Binds before yielding, so a bad host or a port in use is a ConfigError here ("cannot
    serve metrics at ..."), before the caller mounts anything."""
    from .peer._server import PeerServer, PeerServerLimits

    server = PeerServer(host, port, registry=metrics.registry, name="metrics", ready=True,
                        limits=PeerServerLimits(head_timeout=SCRAPE_TIMEOUT,
                                                max_connections=64))
    bound = await server.bind()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield bound
        nursery.cancel_scope.cancel()
