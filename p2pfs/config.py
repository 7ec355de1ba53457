"""Settings: frozen, keyword-only dataclasses with every default in one place.

Layers, lowest first: these defaults, a TOML file (`--config`), command-line flags. Only
the CLI reads files and flags; core code gets these objects as explicit arguments. S3
credentials and region come from the standard AWS chain (environment, ~/.aws), which
botocore reads itself.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True, kw_only=True)
class S3Config:
    #: S3 endpoint (e.g. http://127.0.0.1:8333); None uses AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str | None = None
    #: Region; None lets botocore decide (AWS_REGION, ~/.aws/config), else us-east-1.
    region: str | None = None
    #: Send unsigned requests (public buckets).
    anonymous: bool = False
    #: Seconds to open a connection.
    connect_timeout: float = 5.0
    #: Seconds without a byte before one request is abandoned (and retried).
    request_timeout: float = 20.0
    #: Ranged GETs through p2pfs's lean HTTP client (presigned by botocore) instead of
    #: aiobotocore's get_object: about 2x the throughput here. Turn off behind HTTP proxies.
    fast_get: bool = True
    #: Path-style addressing (http://host/bucket/key), what most S3-compatible servers need.
    path_style: bool = True
    #: Multipart upload part size for `publish`.
    upload_part_size: int = 16 * MiB
    #: Parallel part uploads / index reads.
    upload_concurrency: int = 8


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    #: Local chunk cache directory (one daemon per directory; it is locked).
    dir: Path = Path("/var/cache/p2pfs")
    #: Byte budget of the disk cache; least recently used chunks are evicted beyond it.
    size: int = 100 * GiB
    #: In-memory chunk cache (recently read and read-ahead chunks).
    memory_size: int = 512 * MiB
    #: Chunks waiting to be written back; when full, write-back of new chunks is skipped
    #: (counted in metrics) rather than making a reader wait for the disk.
    writeback_queue: int = 32
    #: Threads writing chunks back to disk.
    writeback_workers: int = 2


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    #: Origin requests in flight at once.
    concurrency: int = 16
    #: Adjacent chunks of one blob are fetched with one ranged GET of at most this size.
    max_request: int = 8 * MiB
    #: A read whose data cannot be had within this many seconds fails with EIO.
    read_timeout: float = 30.0
    #: Retry backoff: first delay and cap, seconds (full jitter).
    retry_base: float = 0.1
    retry_max: float = 2.0
    #: Sequential read-ahead window, bytes: starts at the first, doubles up to the second.
    readahead_min: int = 8 * MiB
    readahead_max: int = 128 * MiB


@dataclass(frozen=True, kw_only=True)
class MountConfig:
    #: Kernel read-ahead of the mount's bdi, KiB (Linux default for FUSE is 128).
    read_ahead_kb: int = 1024
    #: fusectl max_background: requests the kernel keeps in flight to the daemon.
    max_background: int = 64
    #: Let users other than the mounting one read the mount.
    allow_other: bool = True
    #: Prometheus endpoint ("127.0.0.1:9464"); "" turns it off.
    metrics_addr: str = ""
    #: Seconds the kernel may cache attributes and names (the tree is immutable).
    attr_timeout: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class PublishConfig:
    #: Chunk size of new manifests (power of two recommended). 8 MiB measured ~30% faster
    #: cold and fewer files warm than 4 MiB here (bench/RESULTS.md); smaller chunks
    #: suit random access better.
    chunk_size: int = 8 * MiB


@dataclass(frozen=True, kw_only=True)
class Config:
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int) -> int:
    """'200GiB', '512M', '4096' -> bytes (binary units; 'GB' is read as GiB too)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 512MiB, 200GiB)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def _coerce(cls: type, section: str, raw: dict[str, Any], base: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"[{section}] unknown setting {key!r} (known: {', '.join(fields)})")
        default = getattr(base, name)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, int):
                value = parse_size(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, Path):
                value = Path(value)
            elif default is None or isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError, ConfigError):
            raise ConfigError(f"[{section}] {key} = {value!r} is not a valid value") from None
        values[name] = value
    return dataclasses.replace(base, **values)


def load_config(path: Path | None, base: Config | None = None) -> Config:
    """Read a TOML file with sections [s3], [cache], [fetch], [mount], [publish]."""
    cfg = base or Config()
    if path is None:
        return cfg
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    updates = {}
    for name, raw in doc.items():
        if name not in sections or not isinstance(raw, dict):
            raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(sections)})")
        updates[name] = _coerce(type(getattr(cfg, name)), name, raw, getattr(cfg, name))
    return dataclasses.replace(cfg, **updates)


def override(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Apply flag values (None means 'not given') on top of `cfg`."""
    updates = {}
    for name, raw in sections.items():
        raw = {k: v for k, v in raw.items() if v is not None}
        if raw:
            updates[name] = _coerce(type(getattr(cfg, name)), name, raw, getattr(cfg, name))
    return dataclasses.replace(cfg, **updates)
