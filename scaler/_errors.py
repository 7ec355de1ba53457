"""The scaler exception tree.

    ScalerError
    ├── ConfigError          bad settings, flags or TOML (our user's mistake)
    ├── TraceError           a trace file that cannot be read or parsed
    ├── ProtocolError        a client or replica spoke broken HTTP, or sent too much
    ├── ReplicaError         a replica failed us
    │   ├── ReplicaUnavailable   connection refused/reset or it died before answering (retryable)
    │   └── ReplicaTimeout       no answer within the request deadline (not retried)
    ├── ActuatorError        starting/stopping replicas failed (process spawn, Kubernetes API)
    └── MetricsError         the proxy's /metrics could not be fetched or parsed (KEDA shell)

Library errors (h11, OSError, trio, kubernetes ApiException, grpc) are mapped to these at
the edge where they happen; the proxy turns them into HTTP status codes in one place
(`_proxy.py`), the KEDA server into gRPC status codes in one place (`keda/_server.py`).
"""

from __future__ import annotations


class ScalerError(Exception):
    """Base of every error the scaler raises on purpose."""


class ConfigError(ScalerError):
    pass


class TraceError(ScalerError):
    pass


class ProtocolError(ScalerError):
    """`status` is the answer to a client that caused it: 400, 413 (body too large) or
    431 (head too large). From a replica it is always a 502."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ReplicaError(ScalerError):
    pass


class ReplicaUnavailable(ReplicaError):
    pass


class ReplicaTimeout(ReplicaError):
    pass


class ActuatorError(ScalerError):
    pass


class MetricsError(ScalerError):
    pass
