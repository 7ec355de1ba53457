"""Settings: frozen, keyword-only dataclasses with every default and allowed range in one
place.

Layers, lowest first: these defaults, a TOML file (`--config`), command-line flags; the
layering, coercion and range checks are `p2pfs.settings`, shared with p2pfs-scaler. Every
value is checked when a config is built (`__post_init__`), so a bad one is a ConfigError
naming its key and range, not a failure deep inside trio. Only the CLI reads files and
flags; core code gets these objects as explicit arguments. S3 credentials and region come
from the standard AWS chain (environment, ~/.aws), which botocore reads itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import settings
from .errors import ConfigError
from .manifest import CHUNK_HASHES
from .settings import GiB, KiB, MiB, TiB, setting

__all__ = ["Config", "S3Config", "CacheConfig", "FetchConfig", "MountConfig", "PublishConfig",
           "PeersConfig", "load_config", "override", "absolute_paths", "complete", "parse_size",
           "KiB", "MiB", "GiB", "TiB"]

#: Largest chunk a manifest may name (manifest.MAX_CHUNK_SIZE); publish stays within it.
MAX_CHUNK_SIZE = 64 * MiB


@dataclass(frozen=True, kw_only=True)
class S3Config:
    SECTION: ClassVar[str] = "s3"
    #: S3 endpoint (e.g. http://127.0.0.1:8333); None uses AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str | None = None
    #: Region; None lets botocore decide (AWS_REGION, ~/.aws/config), else us-east-1.
    region: str | None = None
    #: Send unsigned requests (public buckets).
    anonymous: bool = False
    #: Seconds to open a connection.
    connect_timeout: float = setting(5.0, gt=0, le=3600)
    #: Seconds without a byte before one request is abandoned (and retried).
    request_timeout: float = setting(20.0, gt=0, le=3600)
    #: Ranged GETs through p2pfs's lean HTTP client (presigned by botocore) instead of
    #: aiobotocore's get_object: about 2x the throughput here. Turn off behind HTTP proxies.
    fast_get: bool = True
    #: Path-style addressing (http://host/bucket/key), what most S3-compatible servers need.
    path_style: bool = True
    #: Multipart upload part size for `publish` (S3's limits: 5 MiB to 5 GiB).
    upload_part_size: int = setting(16 * MiB, ge=5 * MiB, le=5 * GiB, size=True)
    #: Parallel part uploads / index reads.
    upload_concurrency: int = setting(8, ge=1, le=256)

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"[s3] endpoint_url = {self.endpoint_url!r}: must start with "
                              "http:// or https://")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    SECTION: ClassVar[str] = "cache"
    #: Local chunk cache directory (one daemon per directory; it is locked).
    dir: Path = Path("/var/cache/p2pfs")
    #: Byte budget of the disk cache; least recently used chunks are evicted beyond it.
    size: int = setting(100 * GiB, ge=0, le=1024 * TiB, size=True)
    #: In-memory chunk cache (recently read and read-ahead chunks).
    memory_size: int = setting(512 * MiB, ge=0, le=1024 * TiB, size=True)
    #: Touch the memory tier's memory (up to 1 GiB) once at start, so the first reads
    #: fault in no fresh pages: for long-lived node daemons on VMs where fresh memory is
    #: slow (here 2.3 s per 512 MiB); resident memory starts at that size.
    memory_prefault: bool = False
    #: Chunks waiting to be written back, at most this many and `writeback_bytes` bytes;
    #: when full, write-back of new chunks is skipped (counted in metrics) rather than
    #: making a reader wait for the disk.
    writeback_queue: int = setting(8192, ge=1, le=65536)
    writeback_bytes: int = setting(256 * MiB, ge=0, le=1024 * TiB, size=True)
    #: Write-back waits while fewer CPUs than this are idle (at most 3 s, and not while the
    #: queue is half full): a busy node's CPU goes to its readers (a container starting),
    #: the disk gets the idle rest; 0 writes at once.
    writeback_idle_cpus: float = setting(1.0, ge=0, le=4096)
    #: Threads writing chunks back to disk.
    writeback_workers: int = setting(2, ge=1, le=64)

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    SECTION: ClassVar[str] = "fetch"
    #: Origin requests in flight at once.
    concurrency: int = setting(16, ge=1, le=1024)
    #: Adjacent chunks of one blob are fetched with one ranged GET of at most this size.
    max_request: int = setting(8 * MiB, ge=4 * KiB, le=GiB, size=True)
    #: Two chunks of one blob with at most this many unwanted stored bytes between them
    #: are fetched with one GET that reads through the gap (its bytes are dropped): a
    #: request costs more than that many bytes (bench/RESULTS.md, "Reading through
    #: gaps"). 0: only chunks that lie back to back share a GET.
    max_gap: int = setting(256 * KiB, ge=0, le=64 * MiB, size=True)
    #: A read whose data cannot be had within this many seconds fails with EIO.
    read_timeout: float = setting(30.0, gt=0, le=86400)
    #: After a read of a chunk fails, reads of that chunk fail at once for this many
    #: seconds (the kernel retries a failed read-ahead synchronously; without this a
    #: reader would wait 2-3x read_timeout). 0 turns it off.
    fail_fast: float = setting(5.0, ge=0, le=3600)
    #: Retry backoff: first delay and cap, seconds (full jitter); retry_max >= retry_base.
    retry_base: float = setting(0.1, gt=0, le=60)
    retry_max: float = setting(2.0, gt=0, le=600)
    #: Sequential read-ahead window, bytes: starts at the first, doubles up to the second.
    readahead_min: int = setting(8 * MiB, ge=0, le=4 * GiB, size=True)
    readahead_max: int = setting(128 * MiB, ge=0, le=4 * GiB, size=True)
    #: Image layers: on a read that fetches a chunk of a pack, also fetch this many stored
    #: bytes of the pack after it (the files next to it in the layer's tar); 0 turns it off.
    pack_readahead: int = setting(1 * MiB, ge=0, le=GiB, size=True)

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)
        if self.retry_max < self.retry_base:
            raise ConfigError(f"[fetch] retry_max = {self.retry_max!r}: must be >= retry_base "
                              f"({self.retry_base!r})")
        if self.readahead_max < self.readahead_min:
            raise ConfigError(f"[fetch] readahead_max = {self.readahead_max!r}: must be >= "
                              f"readahead_min ({self.readahead_min!r})")


@dataclass(frozen=True, kw_only=True)
class MountConfig:
    SECTION: ClassVar[str] = "mount"
    #: Kernel read-ahead of the mount's bdi, KiB (Linux default for FUSE is 128).
    read_ahead_kb: int = setting(1024, ge=0, le=1 << 20)
    #: fusectl max_background: requests the kernel keeps in flight to the daemon.
    max_background: int = setting(64, ge=1, le=65535)
    #: Let users other than the mounting one read the mount.
    allow_other: bool = True
    #: Prometheus endpoint HOST:PORT ("127.0.0.1:9464", "[::1]:9464"; port 0: any free
    #: port, shown by `p2pfs status`); "" turns it off.
    metrics_addr: str = ""
    #: Seconds the kernel may cache attributes and names (the tree is immutable).
    attr_timeout: float = setting(3600.0, ge=0, le=365 * 86400)
    #: Seconds the kernel may cache that a name does not exist (libfuse's negative_timeout;
    #: a refresh that adds the name drops it at once). 0: ask the daemon every time.
    negative_timeout: float = setting(3600.0, ge=0, le=365 * 86400)
    #: Group (name or gid) whose members may use the control socket besides root and the
    #: daemon's user (checked by SO_PEERCRED; the socket file is then 0660 of that
    #: group); "" allows only those two (socket file 0600).
    control_group: str = ""
    #: Control connections served at once (fill sessions included); more get a "busy" error.
    control_max_connections: int = setting(256, ge=1, le=65536)
    #: Seconds a control connection has to send its request; also the most the daemon
    #: waits for a client to take a reply line.
    control_idle_timeout: float = setting(30.0, gt=0, le=86400)
    #: Seconds a fill session may sit with no request in flight before the daemon closes
    #: it (p2pfs.fill.FillClient opens a new one when needed).
    control_fill_idle_timeout: float = setting(120.0, gt=0, le=86400)
    #: Image layers: a layer's reads from its first open until they pause for 2 s, and
    #: for at most this many seconds, are recorded as its start-up list (stored next to
    #: its manifest; later nodes prefetch it on first open). 0 turns both off.
    startup_window: float = setting(60.0, ge=0, le=3600)
    #: Mount a prefix with no manifest under it yet (an image layers prefix before its
    #: first conversion); what is published later appears with `p2pfs refresh`.
    allow_empty: bool = False
    #: Image layers mounted as EROFS: push the bytes the pack read-ahead and start-up
    #: lists prefetch into the kernel's page cache of the layer's blob (FUSE notify_store),
    #: so EROFS reads them without a FUSE request (p2pfs/pagepush.py): 70% fewer blob
    #: reads per torch-serve start, cold starts 0.86x (bench/RESULTS.md, "The daemon's
    #: CPU"); false sends every page through a FUSE read.
    erofs_page_push: bool = True

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)
        if self.metrics_addr:
            try:
                settings.parse_host_port(self.metrics_addr)
            except ValueError as exc:
                raise ConfigError(f"[mount] metrics_addr: {exc}") from None

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return settings.parse_host_port(self.metrics_addr) if self.metrics_addr else None


@dataclass(frozen=True, kw_only=True)
class PublishConfig:
    SECTION: ClassVar[str] = "publish"
    #: Chunk size of new manifests (power of two recommended). 8 MiB measured ~30% faster
    #: cold and fewer files warm than 4 MiB here (bench/RESULTS.md); smaller chunks
    #: suit random access better.
    chunk_size: int = setting(8 * MiB, ge=4 * KiB, le=MAX_CHUNK_SIZE, size=True)
    #: How chunk digests are taken: "blake3" (2-2.5x less CPU per byte verified than sha256
    #: here, on every read of every node: bench/RESULTS.md "BLAKE3 chunk digests") makes a
    #: version 3 manifest; "sha256" makes one that p2pfs before v3 mounts too.
    chunk_hash: str = "blake3"

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)
        if self.chunk_hash not in CHUNK_HASHES:
            raise ConfigError(f"[publish] chunk_hash = {self.chunk_hash!r}: must be one of "
                              f"{', '.join(CHUNK_HASHES)}")


@dataclass(frozen=True, kw_only=True)
class PeersConfig:
    """Chunks shared between the nodes of one cluster; off unless `listen` is set."""

    SECTION: ClassVar[str] = "peers"
    #: This node's peer address HOST:PORT ("10.0.0.7:7946", "[fd00::7]:7946"). It is also
    #: the node's id on the placement ring, so it must be the address the others list or
    #: resolve (not 0.0.0.0). None: no peers, the daemon behaves as without this section.
    listen: str | None = None
    #: A static member list of HOST:PORT addresses (this node's may be among them).
    members: tuple[str, ...] = ()
    #: NAME:PORT whose every A/AAAA record is a member (a Kubernetes headless Service).
    dns: str | None = None
    #: Seconds between DNS resolutions of `dns`.
    refresh_interval: float = setting(10.0, gt=0, le=3600)
    #: The cluster token: one token per line, the first signs, a second is also accepted
    #: (rotation); each at least 16 bytes. Required with `listen`.
    token_file: Path | None = None
    #: Nodes that own each chunk (rendezvous hashing); more spreads hot chunks further.
    replicas: int = setting(1, ge=1, le=8)
    #: Seconds to connect to a peer before moving on to the next rank or the origin.
    connect_timeout: float = setting(0.25, gt=0, le=60)
    #: Seconds a peer request may go without progress (a byte of the answer, or the
    #: owner's `102 Processing` while it fetches the chunk itself) before the next rank or
    #: the origin is asked; below [fetch] read_timeout. The whole request gets at most two
    #: thirds of what is left of the read deadline, so the origin always has the last third.
    request_timeout: float = setting(2.0, gt=0, le=3600)
    #: Chunk answers this node sends to peers at once ...
    max_uploads: int = setting(16, ge=1, le=4096)
    #: ... and more requests in progress (waiting for the data, or for a send slot);
    #: beyond that the answer is 503 with Retry-After.
    upload_queue: int = setting(64, ge=0, le=65536)
    #: Bytes per second this node serves to peers in all; 0: no cap.
    upload_rate: int = setting(0, ge=0, le=TiB, size=True)
    #: Requests to the origin that may be hedges of slow peer requests, as a fraction of
    #: peer requests (so hedging never doubles origin egress).
    hedge_fraction: float = setting(0.05, ge=0, le=0.5)
    #: A peer request slower than 3x this quantile of recent peer latencies is hedged.
    hedge_quantile: float = setting(0.9, ge=0.5, le=0.999)
    #: Seconds a peer that sent bad bytes or broke the protocol is banned; doubles per ban
    #: up to ban_max (>= ban_base).
    ban_base: float = setting(30.0, gt=0, le=86400)
    ban_max: float = setting(3600.0, gt=0, le=7 * 86400)
    #: fail_threshold failures (timeouts, refusals, 503) within fail_window seconds mark a
    #: peer down for down_for seconds.
    fail_window: float = setting(10.0, gt=0, le=3600)
    fail_threshold: int = setting(3, ge=1, le=1000)
    down_for: float = setting(5.0, gt=0, le=3600)
    #: Seconds a signed request's timestamp may be off this node's clock.
    token_window: float = setting(30.0, ge=1, le=3600)
    #: Seconds SIGTERM waits for peer requests in progress (new ones get 503) before exit.
    drain_timeout: float = setting(10.0, ge=0, le=3600)

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)
        if self.listen is not None:
            if _is_wildcard(_address(self.listen, "listen")[0]):
                raise ConfigError(f"[peers] listen = {self.listen!r}: give this node's own address "
                                  "(it is the node's id on the ring), not a wildcard")
        for member in self.members:
            _address(member, "members")
        if self.dns is not None:
            _address(self.dns, "dns")
        if self.connect_timeout > self.request_timeout:
            raise ConfigError(f"[peers] connect_timeout = {self.connect_timeout!r}: must be <= "
                              f"request_timeout ({self.request_timeout!r})")
        if self.ban_max < self.ban_base:
            raise ConfigError(f"[peers] ban_max = {self.ban_max!r}: must be >= ban_base "
                              f"({self.ban_base!r})")

    @property
    def enabled(self) -> bool:
        return self.listen is not None


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


def _address(text: str, key: str) -> tuple[str, int]:
    try:
        return settings.parse_host_port(text, allow_zero=False)
    except ValueError as exc:
        raise ConfigError(f"[peers] {key}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Config:
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)

    def __post_init__(self) -> None:
        if self.peers.enabled and self.peers.request_timeout >= self.fetch.read_timeout:
            raise ConfigError(f"[peers] request_timeout = {self.peers.request_timeout!r}: must be "
                              f"< [fetch] read_timeout ({self.fetch.read_timeout!r}), so a dead "
                              "peer leaves time to read from the origin")


def parse_size(text: str | int) -> int:
    """'200GiB', '512M', '4096' -> bytes (binary units; 'GB' is read as GiB too)."""
    try:
        return settings.parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{text!r}: {exc}") from None


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def load_config(path: Path | None, base: Config | None = None) -> Config:
    """Read a TOML file with sections [s3], [cache], [fetch], [mount], [publish], [peers]."""
    cfg = base or Config()
    doc = settings.read_toml(path, _SECTIONS, error=ConfigError)
    return _layer(cfg, doc, where=f"config file {path}: ")


def override(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Apply flag values (None means 'not given') on top of `cfg`."""
    return _layer(cfg, sections)


def _layer(cfg: Config, sections: dict[str, dict[str, Any]], where: str = "") -> Config:
    updates = {}
    for name, raw in sections.items():
        if raw and any(v is not None for v in raw.values()):
            base = getattr(cfg, name)
            updates[name] = settings.build(type(base), raw, error=ConfigError, base=base, where=where)
    return dataclasses.replace(cfg, **updates)


def complete(cfg: Config) -> Config:
    """`cfg`, once every layer is applied, checked by the rules whose two halves may come
    from different layers (the ConfigMap names the token file and the DNS name, a flag
    this node's address), so no single layer can be refused for them."""
    peers = cfg.peers
    if not peers.enabled and (peers.members or peers.dns):
        raise ConfigError("[peers] members and dns need listen (this node's peer address, "
                          "--peer-listen)")
    if peers.enabled and peers.token_file is None:
        raise ConfigError("[peers] listen needs token_file (the cluster token, "
                          "--cluster-token-file): peers answer only signed requests")
    return cfg


def absolute_paths(cfg: Config, cwd: str | None = None) -> Config:
    """Every path setting made absolute against `cwd` (default: the current directory).

    The daemon publishes paths to clients in other directories (the control socket's path
    is an xattr of the mount) and may change its own directory, so a relative path would
    break them; resolving once, at startup, keeps every later use the same."""
    cwd = cwd or os.getcwd()
    updates = {}
    for section in _SECTIONS:
        sub = getattr(cfg, section)
        paths = {f.name: Path(os.path.join(cwd, os.path.expanduser(getattr(sub, f.name))))
                 for f in dataclasses.fields(sub) if isinstance(getattr(sub, f.name), Path)}
        if paths:
            updates[section] = dataclasses.replace(
                sub, **{k: Path(os.path.normpath(v)) for k, v in paths.items()})
    return dataclasses.replace(cfg, **updates)
