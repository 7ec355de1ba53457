"""p2pfs-scaler: a concurrency-based autoscaler.

A queue proxy in front of replicas measures concurrency (requests in flight plus
queued); a pure policy turns it into a replica count (stable and panic windows, rate
limits, scale-down delay, standby replicas, scale to zero); an actuator (local
processes, a Kubernetes Deployment) makes it so, or KEDA does through our external
scaler. A simulator replays traces against our policy and the anchors (Knative KPA,
Kubernetes HPA, Ray Serve). Design and defaults: docs/SCALER.md.

Exceptions (all raised on purpose derive from ScalerError):

    ScalerError
    ├── ConfigError          bad settings, flags or TOML (our user's mistake)
    ├── TraceError           a trace file that cannot be read or parsed
    ├── ProtocolError        a client or replica spoke broken HTTP, or sent too much
    ├── ReplicaError         a replica failed us
    │   ├── ReplicaUnavailable   refused/reset/died before answering (retried elsewhere)
    │   └── ReplicaTimeout       no answer within the request deadline (not retried)
    ├── ActuatorError        starting/stopping replicas failed (process, Kubernetes API)
    └── MetricsError         /metrics could not be fetched or parsed (KEDA shell)
"""

from ._actuator import Actuator, Hooks
from ._app import Running, run_proxy
from ._baselines import (HpaConfig, HpaPolicy, KpaConfig, KpaPolicy, RayServeConfig,
                         RayServePolicy, kpa_policy)
from ._config import (KedaConfig, KubernetesConfig, LocalConfig, PolicyConfig, ProxyConfig,
                      SimConfig)
from ._dispatch import Dispatcher, Endpoint
from ._errors import (ActuatorError, ConfigError, MetricsError, ProtocolError, ReplicaError,
                      ReplicaTimeout, ReplicaUnavailable, ScalerError, TraceError)
from ._family import Shape, family, generate
from ._kube import KubernetesActuator
from ._local import LocalActuator
from ._policies import make_policy
from ._policy import ConcurrencyPolicy, Decision, Fleet, Policy, Sample
from ._sim import SimResult, simulate
from ._trace import Trace, bursty, diurnal, load, load_azure, load_csv, write_csv

__all__ = [
    "Actuator", "ActuatorError", "ConcurrencyPolicy", "ConfigError", "Decision", "Dispatcher",
    "Endpoint", "Fleet", "Hooks", "HpaConfig", "HpaPolicy", "KedaConfig", "KpaConfig",
    "KpaPolicy", "KubernetesActuator", "KubernetesConfig", "LocalActuator", "LocalConfig",
    "MetricsError", "Policy", "PolicyConfig", "ProtocolError", "ProxyConfig", "RayServeConfig",
    "RayServePolicy", "ReplicaError", "ReplicaTimeout", "ReplicaUnavailable", "Running",
    "Sample", "ScalerError", "Shape", "SimConfig", "SimResult", "Trace", "TraceError", "bursty",
    "diurnal", "family", "generate", "kpa_policy", "load", "load_azure", "load_csv",
    "make_policy", "run_proxy", "simulate", "write_csv",
]
