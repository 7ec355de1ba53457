"""Parsing of origin URLs: `s3://bucket/prefix` and `file:///dir/prefix`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Location:
    scheme: str  # "s3" or "file"
    bucket: str  # bucket name, or the directory for file://
    prefix: str  # "" or "a/b/" (always ends with "/")

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.bucket}/{self.prefix}".rstrip("/")
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str) -> Location:
    """`s3://bucket[/prefix]`; `file:///root[//prefix]` uses the whole path as the root."""
    u = urlparse(url)
    if u.scheme == "s3":
        if not u.netloc:
            raise ConfigError(f"{url!r}: no bucket (expected s3://bucket/prefix)")
        prefix = u.path.strip("/")
        return Location("s3", u.netloc, prefix + "/" if prefix else "")
    if u.scheme == "file":
        root, _, prefix = u.path.partition("//")
        if not root.startswith("/"):
            raise ConfigError(f"{url!r}: file URLs need an absolute path")
        prefix = prefix.strip("/")
        return Location("file", root.rstrip("/") or "/", prefix + "/" if prefix else "")
    raise ConfigError(f"{url!r}: unsupported scheme (use s3://bucket/prefix or file:///dir)")
