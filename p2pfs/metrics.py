"""Counters and a latency histogram, rendered as Prometheus text or a status dict.

Owned by the daemon and passed explicitly to the components that count things. Updates
happen on the trio thread (plain ints), so no locking is needed.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any, Callable

# Fetch latency buckets, seconds (upper bounds).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
        # Gauges read at render time (set by the daemon).
        self.gauges: dict[str, Callable[[], float]] = {}

    @property
    def hit_ratio(self) -> float | None:
        hits = sum(self.hits.values())
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
            **{k: g() for k, g in self.gauges.items()},
        }

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP p2pfs_{name} {help_}")
            out.append(f"# TYPE p2pfs_{name} {kind}")
            for labels, value in samples:
                out.append(f"p2pfs_{name}{labels} {value}")

        metric("reads_total", "counter", "FUSE read requests served.", [("", self.reads)])
        metric("read_bytes_total", "counter", "Bytes returned to readers.", [("", self.read_bytes)])
        metric("chunk_hits_total", "counter", "Chunk lookups served from a cache tier.",
               [(f'{{tier="{t}"}}', self.hits[t]) for t in ("memory", "disk")])
        metric("chunk_misses_total", "counter", "Chunk lookups that went to the origin.",
               [("", self.misses)])
        metric("bytes_total", "counter", "Chunk bytes loaded, by source (memory hits load nothing).",
               [(f'{{source="{s}"}}', self.bytes_by_source[s]) for s in ("disk", "origin")])
        metric("origin_requests_total", "counter", "Ranged GETs sent to the origin.",
               [("", self.origin_requests)])
        metric("errors_total", "counter", "Errors, by kind.",
               [(f'{{kind="{k}"}}', v) for k, v in sorted(self.errors.items())] or [('{kind="none"}', 0)])
        metric("writeback_total", "counter", "Chunks written back to the disk cache.",
               [("", self.writeback_done)])
        metric("writeback_dropped_total", "counter",
               "Chunks not written back because the queue was full.", [("", self.writeback_dropped)])
        metric("fill_requests_total", "counter",
               "Control-socket fill requests (file ranges written into a client's memory).",
               [("", self.fill_requests)])
        metric("fill_bytes_total", "counter", "Bytes written into clients' memory by fill.",
               [("", self.fill_bytes)])
        for name, h, help_ in (("fetch_seconds", self.fetch_latency, "Latency of origin requests."),
                               ("read_seconds", self.read_latency, "Latency of FUSE reads.")):
            out.append(f"# HELP p2pfs_{name} {help_}")
            out.append(f"# TYPE p2pfs_{name} histogram")
            cum = 0
            for b, c in zip(h.buckets, h.counts):
                cum += c
                out.append(f'p2pfs_{name}_bucket{{le="{b}"}} {cum}')
            out.append(f'p2pfs_{name}_bucket{{le="+Inf"}} {h.n}')
            out.append(f"p2pfs_{name}_sum {h.total}")
            out.append(f"p2pfs_{name}_count {h.n}")
        for k, g in sorted(self.gauges.items()):
            metric(k, "gauge", k.replace("_", " ") + ".", [("", g())])
        return "\n".join(out) + "\n"
