"""Object stores p2pfs reads blobs and manifests from, behind one small interface.

`Origin` is the interface; `S3Origin` (aiobotocore under trio-asyncio) and `LocalDirOrigin`
(a directory on disk, for tests and air-gapped use) implement it, and both pass the same
test suite (tests/test_origin.py). Every implementation raises only p2pfs's own
`OriginError` subclasses.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from ._base import ObjectInfo, Origin, ProgressFn
from ._local import LocalDirOrigin
from ._url import Location, parse_url

__all__ = ["ObjectInfo", "Origin", "ProgressFn", "LocalDirOrigin", "Location", "parse_url", "open_origin"]


@asynccontextmanager
async def open_origin(loc: Location, s3=None) -> AsyncIterator[Origin]:
    """Open the origin a URL names. S3 needs a running trio-asyncio loop (see `S3Origin`)."""
    if loc.scheme == "file":
        yield LocalDirOrigin(loc.bucket)
        return
    from ._s3 import S3Origin
    from ..config import S3Config

    origin = await S3Origin.create(loc.bucket, s3 or S3Config())
    try:
        yield origin
    finally:
        await origin.aclose()
