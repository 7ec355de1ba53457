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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import settings
from .errors import ConfigError
from .settings import GiB, KiB, MiB, TiB, setting

__all__ = ["Config", "S3Config", "CacheConfig", "FetchConfig", "MountConfig", "PublishConfig",
           "load_config", "override", "absolute_paths", "parse_size", "KiB", "MiB", "GiB", "TiB"]

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
    #: Chunks waiting to be written back; when full, write-back of new chunks is skipped
    #: (counted in metrics) rather than making a reader wait for the disk.
    writeback_queue: int = setting(32, ge=1, le=65536)
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

    def __post_init__(self) -> None:
        settings.check(self, ConfigError)


@dataclass(frozen=True, kw_only=True)
class Config:
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


def parse_size(text: str | int) -> int:
    """'200GiB', '512M', '4096' -> bytes (binary units; 'GB' is read as GiB too)."""
    try:
        return settings.parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{text!r}: {exc}") from None


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def load_config(path: Path | None, base: Config | None = None) -> Config:
    """Read a TOML file with sections [s3], [cache], [fetch], [mount], [publish]."""
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
