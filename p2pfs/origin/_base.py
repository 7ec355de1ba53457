"""The origin interface."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

ProgressFn = Callable[[int], None]  # called with a number of bytes just completed


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""


class Origin(Protocol):
    """Keys are relative to the origin's root (an S3 bucket, a local directory)."""

    name: str

    async def get_range(self, key: str, offset: int, length: int, *,
                        timeout: float | None = None) -> bytes:
        """Exactly `length` bytes from `offset`; fewer is an error. `timeout` (seconds)
        bounds the whole request, below the implementation's own request timeout: the
        chunk store passes what is left of the read deadline."""

    async def get_range_into(self, key: str, offset: int, dest: memoryview, *,
                             timeout: float | None = None) -> None:
        """Exactly `len(dest)` bytes from `offset`, written into `dest` (no intermediate
        buffer where the implementation can avoid one); fewer is an error. When this
        returns or raises, nothing writes into `dest` any more (the fill path relies on
        it: `dest` is a client's memory); `timeout` as for `get_range`."""

    async def get(self, key: str) -> bytes: ...

    async def head(self, key: str) -> ObjectInfo: ...

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""

    async def put(self, key: str, data: bytes) -> None: ...

    async def upload_file(self, key: str, path: Path, progress: ProgressFn | None = None) -> None: ...

    async def aclose(self) -> None: ...
