"""Settings: frozen, keyword-only dataclasses with every default in one place.

Layers, lowest first: these defaults, a TOML file (`--config`, one table per dataclass:
`[policy]`, `[proxy]`, `[local]`, `[containerd]`, `[kubernetes]`, `[keda]`, `[sim]`), command-line flags.
Only `cli.py` reads files and flags; core code receives these objects as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from p2pfs import settings

from ._errors import ConfigError

MiB = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The concurrency policy (`ConcurrencyPolicy`). Why each default is what it is:
    docs/SCALER.md, "Policy parameters"."""

    #: Concurrency (requests in flight + queued) one serving replica should carry on
    #: average; desired = ceil(average demand / target). Unlike Knative there is no extra
    #: 70% utilization factor: the target means what it says (bursts get `burst_headroom`).
    target_concurrency: float = 4.0
    #: Seconds of demand averaged for ordinary (stable) decisions, and of completed
    #: requests for the mean service time.
    stable_window_s: float = 60.0
    #: Seconds of demand averaged to detect bursts (Knative: 10% of the stable window).
    panic_window_s: float = 6.0
    #: Panic when the panic-window desired count reaches this multiple of the ready
    #: replicas: the panic window's count then applies (Knative's 200%).
    panic_threshold: float = 2.0
    #: Seconds of arrivals averaged for the backlog forecast: short, so that the first
    #: order of a burst is sized for the burst rather than for the seconds before it.
    rate_window_s: float = 2.0
    #: While requests wait: drain the backlog forecast for when new replicas are ready
    #: within this many seconds of their being ready. None: no forecast (stable and panic
    #: wants only). Shorter drains are faster and cost more replicas that each pay a cold
    #: start for this many seconds of work (docs/SCALER.md, "Policy parameters").
    backlog_drain_s: float | None = 30.0
    #: Seconds a new replica takes to be ready (provisioning, pulling, loading) until the
    #: first one is measured; the policy learns it from the fleet after that.
    cold_start_s: float = 60.0
    #: Burst headroom: after a burst outran the ready slots, keep slots for up to this
    #: multiple of the stable demand (the burst's height if lower: peak / pre-burst
    #: demand) for burst_memory_s. 0 turns it off; the target alone leaves 2x (8 slots
    #: for a target of 4).
    burst_headroom: float = 3.0
    #: Seconds a burst's height is remembered for the headroom.
    burst_memory_s: float = 3600.0
    #: Headroom before (and between) remembered bursts: slots for at least this multiple
    #: of the stable demand, at most burst_headroom (2.5: one replica's 8 slots per 3.2
    #: of demand; Knative's 70% utilization target keeps 2.8). The first burst of a trace
    #: finds no burst height remembered. 0 turns it off (docs/SCALER.md, "Policy
    #: parameters": 2.8 wins as often on the family and costs more than the HPA on diurnal).
    base_headroom: float = 2.5
    #: A replica still starting is cancelled only once the count that wants it has been
    #: lower for this many seconds (Knative's panic window), and it is kept only for what
    #: is wanted now (panic window, forecast, headroom), not for a stable window that
    #: still remembers a burst that is over. 0: cancel at once, keep for the stable want.
    order_hold_s: float = 6.0
    #: Seconds a lower desired count must persist before it is applied (max over the window).
    scale_down_delay_s: float = 0.0
    #: At most ceil(rate * ready) serving replicas after one decision.
    max_scale_up_rate: float = 1000.0
    #: At least floor(ready / rate) serving replicas after one decision.
    max_scale_down_rate: float = 2.0
    #: Fewest serving replicas; 0 allows scale to zero.
    min_replicas: int = 0
    #: Most serving replicas (standby replicas are on top of this).
    max_replicas: int = 8
    #: Most warm, not-yet-serving replicas (standby). The count follows the scale step:
    #: the largest step (replicas a burst waited for) in the last standby_decay_s, capped
    #: here, so the next such step skips provisioning. 0 (the default) turns standby off:
    #: in the simulator a standby costs what a serving replica does and serves nothing
    #: until promoted (docs/SCALER.md, "Standby replicas").
    standby: int = 0
    #: Seconds a scale step is remembered; standby falls back to min_standby after this
    #: long without one.
    standby_decay_s: float = 3600.0
    #: Standby replicas kept however quiet the load, scaled to zero included (a faster
    #: wake-up, paid for while idle); at most `standby`.
    min_standby: int = 0
    #: Seconds the desired count must have been zero before the last replica may go.
    scale_to_zero_grace_s: float = 30.0
    #: Keep-alive: the last replica stays after requests stop for as long as a wake-up
    #: would cost, the cold start plus the wait of the requests that arrive during it,
    #: with one request-second of waiting priced at this many replica-seconds (0: no
    #: keep-alive beyond the grace period).
    wait_cost: float = 1.0
    #: Longest keep-alive, however busy the service was.
    max_keepalive_s: float = 3600.0
    #: Seconds between decisions.
    tick_s: float = 0.5
    #: Seconds between load samples (each the time average since the previous one).
    sample_s: float = 0.5

    def __post_init__(self) -> None:
        _positive(self, "target_concurrency", "stable_window_s", "panic_window_s", "tick_s",
                  "sample_s", "max_scale_up_rate", "max_scale_down_rate", "standby_decay_s",
                  "rate_window_s", "cold_start_s", "burst_memory_s", "max_keepalive_s")
        if self.panic_window_s > self.stable_window_s:
            raise ConfigError("panic_window_s must not exceed stable_window_s")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError("need 0 <= min_replicas <= max_replicas")
        if self.standby < 0 or self.scale_down_delay_s < 0 or self.scale_to_zero_grace_s < 0:
            raise ConfigError("standby, scale_down_delay_s, scale_to_zero_grace_s must be >= 0")
        if not 0 <= self.min_standby <= self.standby:
            raise ConfigError("need 0 <= min_standby <= standby")
        if self.backlog_drain_s is not None and self.backlog_drain_s <= 0:
            raise ConfigError("backlog_drain_s must be > 0 (or None)")
        if self.panic_threshold < 1:
            raise ConfigError("panic_threshold must be >= 1")
        if min(self.burst_headroom, self.base_headroom, self.wait_cost, self.order_hold_s) < 0:
            raise ConfigError("burst_headroom, base_headroom, wait_cost, order_hold_s must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """The queue proxy in front of the replicas."""

    #: Address the proxy listens on.
    host: str = "127.0.0.1"
    port: int = 8080
    #: Hard limit of requests one replica is sent at once; the rest wait in the queue.
    max_concurrency: int = 8
    #: Most requests waiting in the queue; one more is answered 503 with Retry-After.
    max_queue: int = 1000
    #: Seconds a request may wait in the queue (scale-from-zero included) before a 503.
    queue_timeout_s: float = 60.0
    #: Retry-After seconds sent with every 503.
    retry_after_s: int = 1
    #: Extra attempts on another replica when one dies before sending a response byte.
    max_retries: int = 2
    #: Seconds to open a connection to a replica.
    connect_timeout_s: float = 2.0
    #: Seconds a replica has to send its full response once it has the request.
    request_timeout_s: float = 60.0
    #: Seconds a client has, from a request's first byte, to send its head and body (408).
    client_timeout_s: float = 30.0
    #: Seconds a client has, from a request's first byte, to send its whole head (408): a
    #: client trickling a head (slowloris) holds its connection slot no longer than this.
    head_timeout_s: float = 10.0
    #: While every connection slot is taken and another connection waits for one: seconds
    #: a connection may hold its slot without delivering a whole request head (idle, silent
    #: since it connected, or its head trickling in). Past that the longest such one gives
    #: its slot up (408 if a request had begun), so slow or hostile clients only hold
    #: slots that nobody else needs.
    busy_head_timeout_s: float = 1.0
    #: Seconds a connection may wait for the first byte of its next request (before the
    #: first one, and between keep-alive requests); see also busy_head_timeout_s.
    idle_timeout_s: float = 30.0
    #: Seconds a connection closed on an error answer (400, 408, 413, 431, 503) goes on
    #: reading and discarding what the client still sends, so it reads our answer rather
    #: than a reset.
    linger_s: float = 5.0
    #: Largest request or response body carried (bigger: 413 / 502).
    max_body_bytes: int = 16 * MiB
    #: Largest request head, request line to blank line (bigger: 431, never forwarded).
    max_header_bytes: int = 64 * 1024
    #: Client connections served at once. Up to as many more wait for a slot, each at most
    #: queue_timeout_s (then 503 + Retry-After); beyond that a connection gets 503 at once.
    max_connections: int = 1024

    def __post_init__(self) -> None:
        _positive(self, "max_concurrency", "max_queue", "queue_timeout_s", "connect_timeout_s",
                  "request_timeout_s", "client_timeout_s", "head_timeout_s",
                  "busy_head_timeout_s", "idle_timeout_s", "linger_s", "max_body_bytes",
                  "max_header_bytes", "max_connections")
        if self.max_retries < 0:
            raise ConfigError("max_retries must be >= 0")
        if not self.busy_head_timeout_s <= self.head_timeout_s <= self.client_timeout_s:
            raise ConfigError("need busy_head_timeout_s <= head_timeout_s <= client_timeout_s")


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """Replicas as local processes (the embedded default actuator)."""

    #: Shell command that starts one replica; `{port}` is replaced by a free port.
    replica_cmd: str = ""
    #: Address replicas listen on.
    host: str = "127.0.0.1"
    #: Path probed with GET until it answers 2xx: then the replica is ready.
    ready_path: str = "/healthz"
    #: Seconds between readiness probes.
    probe_interval_s: float = 0.1
    #: Seconds a replica has to become ready before it is killed and counted failed.
    start_timeout_s: float = 300.0
    #: Seconds a stopping replica has to finish its in-flight requests.
    drain_timeout_s: float = 30.0
    #: Seconds between SIGTERM and SIGKILL.
    stop_timeout_s: float = 10.0
    #: After a replica failed to start or died unasked, the next start waits this long,
    #: doubling with each further failure in a row up to max_restart_backoff_s (a replica
    #: that crashes at once must not be restarted in a tight loop); a ready one resets it.
    restart_backoff_s: float = 0.5
    max_restart_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        _positive(self, "probe_interval_s", "start_timeout_s", "stop_timeout_s",
                  "restart_backoff_s", "max_restart_backoff_s")
        if self.replica_cmd and "{port}" not in self.replica_cmd:
            raise ConfigError("replica_cmd must contain {port}")


@dataclass(frozen=True, kw_only=True)
class ContainerdConfig:
    """Replicas as containers on this node, through containerd's `ctr` (with the p2pfs
    snapshotter, images start from lazily fetched layers). The lifecycle settings (ready
    path, timeouts) and the command run in the container (`replica_cmd`, with `{port}`)
    are LocalConfig's."""

    #: Image reference replicas run (pulled once through CRI, so the snapshotter gets the
    #: layer labels it needs to serve layers lazily).
    image: str = ""
    #: containerd snapshotter the containers' root filesystems come from; CRI's own
    #: snapshotter setting must name the same one (CRI unpacks the pull into it).
    snapshotter: str = "p2pfs"
    #: containerd's gRPC socket.
    address: str = "/run/containerd/containerd.sock"
    #: containerd namespace; CRI pulls land in k8s.io, so containers are created there.
    namespace: str = "k8s.io"
    #: Bind mounts, "HOST:CONTAINER[:ro|:rw]" (read-only unless :rw), e.g. the p2pfs
    #: weights mount "/models:/models".
    mounts: tuple[str, ...] = ()
    #: Extra environment of the container, "NAME=VALUE".
    env: tuple[str, ...] = ()
    #: Host command that pulls `{image}` (default: `p2pfs-snapshotter pull` through CRI
    #: at `address`). Run once, by the first replica that needs it.
    pull_cmd: str = ""
    #: Host command run before each replica's container is created (`{id}` and `{port}`
    #: filled in), e.g. an `aws s3 cp` of the weights; its time counts as weights.
    setup_cmd: str = ""
    #: The ctr binary.
    ctr: str = "ctr"
    #: Container ids are PREFIX-<proxy pid>-replica-N; containers of this prefix whose
    #: proxy is gone are removed when the actuator starts.
    id_prefix: str = "p2pfs-scaler"
    #: Seconds the pull, and the setup command, may take.
    pull_timeout_s: float = 900.0
    #: Seconds one other ctr call (create, kill, delete) may take.
    ctr_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _positive(self, "pull_timeout_s", "ctr_timeout_s")
        for m in self.mounts:
            parts = m.split(":")
            if (len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2])
                    or (len(parts) == 3 and parts[2] not in ("ro", "rw"))):
                raise ConfigError(f"mount {m!r}: expected /HOST:/CONTAINER[:ro|:rw]")
        for e in self.env:
            if "=" not in e or e.startswith("="):
                raise ConfigError(f"env {e!r}: expected NAME=VALUE")
        if not self.id_prefix or not all(c.isalnum() or c in "-_." for c in self.id_prefix):
            raise ConfigError(f"id_prefix {self.id_prefix!r}: letters, digits, - _ . only")


@dataclass(frozen=True, kw_only=True)
class KubernetesConfig:
    """A Deployment scaled through its scale subresource."""

    namespace: str = "default"
    deployment: str = ""
    #: host:port the proxy sends requests to (the Deployment's Service).
    upstream: str = ""
    #: Seconds between reads of the Deployment's ready count.
    poll_s: float = 2.0
    #: Seconds one API call may take.
    request_timeout_s: float = 10.0
    #: kubeconfig file; None tries in-cluster config, then ~/.kube/config.
    kubeconfig: str | None = None


@dataclass(frozen=True, kw_only=True)
class KedaConfig:
    """The KEDA external scaler (gRPC)."""

    host: str = "127.0.0.1"
    port: int = 9090
    #: The proxy's Prometheus endpoint the signal is read from.
    metrics_url: str = "http://127.0.0.1:8080/metrics"
    #: Metric name reported to KEDA (and through it to the HPA).
    metric_name: str = "scaler_concurrency"
    #: Per-replica target sent in GetMetricSpec; the HPA then computes ceil(value / target).
    target_concurrency: float = 4.0
    #: Seconds one /metrics fetch may take.
    fetch_timeout_s: float = 2.0
    #: Seconds between StreamIsActive checks.
    stream_interval_s: float = 2.0
    #: gRPC worker threads.
    workers: int = 4


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """The simulator's replica and queue model (the same for every policy)."""

    #: Seconds to get a machine for a replica (skipped by standby replicas).
    provision_s: float = 60.0
    #: Seconds from machine to ready: image pull plus weight load.
    startup_s: float = 30.0
    #: Requests one replica serves at once (its slots); service time is per request.
    max_concurrency: int = 8
    #: Queue bound and deadline, as in ProxyConfig.
    max_queue: int = 100_000
    queue_timeout_s: float = 600.0
    #: A request meets the SLO when its queueing delay is at most this.
    slo_s: float = 1.0
    #: Replicas at t=0 (each policy's minimum is applied on its first decision).
    initial_replicas: int = 1
    #: Seconds per timeline point kept for plots.
    timeline_s: float = 10.0

    def __post_init__(self) -> None:
        _positive(self, "max_concurrency", "max_queue", "queue_timeout_s", "timeline_s")
        if self.provision_s < 0 or self.startup_s < 0 or self.initial_replicas < 0:
            raise ConfigError("provision_s, startup_s, initial_replicas must be >= 0")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {getattr(obj, n)!r}")


_TABLES = {"policy": PolicyConfig, "proxy": ProxyConfig, "local": LocalConfig,
           "containerd": ContainerdConfig, "kubernetes": KubernetesConfig, "keda": KedaConfig, "sim": SimConfig}


def load_toml(path: Path | None) -> dict[str, dict[str, Any]]:
    """The tables of a TOML settings file ({} without one)."""
    return settings.read_toml(path, _TABLES, error=ConfigError)


def build(cls: type[T], *layers: dict[str, Any]) -> T:
    """`cls` from defaults overlaid by each layer in turn (None values are skipped); the
    layering p2pfs uses too (`p2pfs.settings.build`)."""
    table = next((name for name, c in _TABLES.items() if c is cls), cls.__name__)
    return settings.build(cls, *layers, error=ConfigError, section=table)
