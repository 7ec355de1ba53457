"""The KEDA external scaler over a real gRPC channel on loopback, reading a real
Prometheus endpoint."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

import scaler.keda._proto as pb
from scaler import KedaConfig
from scaler.keda import serve


class MetricsServer:
    """A /metrics endpoint whose body the test sets."""

    def __init__(self) -> None:
        self.body = ""
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = outer.body.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keda():
    metrics = MetricsServer()
    cfg = KedaConfig(port=0, metrics_url=metrics.url, target_concurrency=4.5,
                     stream_interval_s=0.05)
    server, servicer, port = serve(cfg)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(name: str, request):
        req, resp, stream = pb.METHODS[name]
        make = channel.unary_stream if stream else channel.unary_unary
        return make(pb.method_path(name), request_serializer=pb.MESSAGES[req].SerializeToString,
                    response_deserializer=pb.MESSAGES[resp].FromString)(request, timeout=5)

    try:
        yield metrics, call
    finally:
        channel.close()
        servicer.stop()
        server.stop(0).wait()
        metrics.close()


REF = pb.ScaledObjectRef(name="model", namespace="default", scalerMetadata={"k": "v"})


def test_is_active_metric_spec_and_metrics(keda):
    metrics, call = keda
    metrics.body = "# TYPE scaler_concurrency gauge\nscaler_concurrency 0\n"
    assert call("IsActive", REF).result is False
    metrics.body = "scaler_concurrency 9.5\n"
    assert call("IsActive", REF).result is True
    spec = call("GetMetricSpec", REF).metricSpecs[0]
    assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == ("scaler_concurrency", 5, 4.5)
    v = call("GetMetrics", pb.GetMetricsRequest(scaledObjectRef=REF,
                                                 metricName="scaler_concurrency")).metricValues[0]
    assert (v.metricName, v.metricValue, v.metricValueFloat) == ("scaler_concurrency", 10, 9.5)


def test_stream_is_active_sends_changes(keda):
    metrics, call = keda
    metrics.body = "scaler_concurrency 0\n"
    stream = call("StreamIsActive", REF)
    assert next(stream).result is False
    metrics.body = "scaler_concurrency 3\n"
    assert next(stream).result is True
    stream.cancel()


def test_unreadable_metrics_are_unavailable_not_zero(keda):
    metrics, call = keda
    metrics.body = "something_else 1\n"
    with pytest.raises(grpc.RpcError) as err:
        call("GetMetrics", pb.GetMetricsRequest(scaledObjectRef=REF))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_proto_file_and_embedded_source_agree():
    path = Path(pb.__file__).with_name("externalscaler.proto")
    assert path.read_text() == pb.PROTO_SOURCE
    fdp = pb.file_descriptor()
    assert [m.name for m in fdp.service[0].method] == [
        "IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics"]
    fields = {m.name: [(f.name, f.number) for f in m.field] for m in fdp.message_type}
    assert fields["MetricValue"] == [("metricName", 1), ("metricValue", 2), ("metricValueFloat", 3)]
    assert fields["ScaledObjectRef"][2] == ("scalerMetadata", 3)
