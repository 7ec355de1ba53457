"""The KEDA external scaler: a gRPC server answering from the proxy's /metrics.

KEDA calls GetMetricSpec once (our per-replica target), then GetMetrics on its polling
interval and hands the value to the HPA it manages, which computes
ceil(value / target) replicas; IsActive (value > 0) lets KEDA scale to and from zero.
grpc's server is thread-based, so this shell is plain threads: each call fetches
/metrics with a timeout; a failed fetch is UNAVAILABLE (KEDA retries, and keeps the
current scale), never a made-up zero that would scale the workload away.
"""

from __future__ import annotations

import logging
import math
import threading
import urllib.error
import urllib.request
from concurrent import futures
from typing import Any, Callable, Iterator

import grpc

from .. import _metrics
from .._config import KedaConfig
from .._errors import MetricsError
from . import _proto as pb

log = logging.getLogger("scaler.keda")


def prometheus_source(url: str, metric: str, timeout: float) -> Callable[[], float]:
    """A function returning the metric's current value from a Prometheus endpoint."""

    def read() -> float:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our URL
                text = resp.read(4 << 20).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise MetricsError(f"cannot fetch {url}: {exc}") from exc
        return _metrics.value(text, metric)

    return read


class ExternalScaler:
    """The four RPCs, over a `source` of the current concurrency."""

    def __init__(self, config: KedaConfig, source: Callable[[], float]) -> None:
        self.config, self._source = config, source
        self._stop = threading.Event()

    def _value(self, context: grpc.ServicerContext) -> float:
        try:
            return self._source()
        except MetricsError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # abort raises; this only satisfies type checkers

    def IsActive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.IsActiveResponse(result=self._value(context) > 0)

    def StreamIsActive(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        last: bool | None = None
        while context.is_active() and not self._stop.is_set():
            active = self._value(context) > 0
            if active != last:
                yield pb.IsActiveResponse(result=active)
                last = active
            self._stop.wait(self.config.stream_interval_s)

    def GetMetricSpec(self, request: Any, context: grpc.ServicerContext) -> Any:
        t = self.config.target_concurrency
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=self.config.metric_name, targetSize=max(1, math.ceil(t)),
            targetSizeFloat=t)])

    def GetMetrics(self, request: Any, context: grpc.ServicerContext) -> Any:
        v = self._value(context)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=request.metricName or self.config.metric_name,
            metricValue=math.ceil(v), metricValueFloat=v)])

    def stop(self) -> None:
        self._stop.set()


def handler(servicer: ExternalScaler) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, (req, resp, stream) in pb.METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name),
                              request_deserializer=pb.MESSAGES[req].FromString,
                              response_serializer=pb.MESSAGES[resp].SerializeToString)
    return grpc.method_handlers_generic_handler(f"{pb.PACKAGE}.{pb.SERVICE}", handlers)


def serve(config: KedaConfig, source: Callable[[], float] | None = None
          ) -> tuple[grpc.Server, ExternalScaler, int]:
    """Start the server (non-blocking); returns it, the servicer and the bound port.
    Stop with `servicer.stop(); server.stop(grace)`."""
    source = source or prometheus_source(config.metrics_url, config.metric_name,
                                         config.fetch_timeout_s)
    servicer = ExternalScaler(config, source)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers))
    server.add_generic_rpc_handlers((handler(servicer),))
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise MetricsError(f"cannot listen on {config.host}:{config.port}")
    server.start()
    log.info("KEDA external scaler on %s:%d reading %s", config.host, port, config.metrics_url)
    return server, servicer, port
