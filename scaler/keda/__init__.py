"""KEDA external scaler (gRPC) over the proxy's concurrency signal."""

from ._server import ExternalScaler, prometheus_source, serve

__all__ = ["ExternalScaler", "prometheus_source", "serve"]
