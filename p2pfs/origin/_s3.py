"""S3 (and S3-compatible) origin: aiobotocore running under trio through trio-asyncio.

Every public method is a trio coroutine; the aiobotocore calls run on the trio-asyncio loop
the caller opened (`trio_asyncio.open_loop()`, done by the daemon and the CLI). botocore's
own retries are off: retrying is the caller's decision (`p2pfs.retry`), made against its
own deadline. botocore/aiohttp errors are mapped to p2pfs's `OriginError` tree here.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions as bx
import trio
import trio_asyncio
from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

from ..config import S3Config
from ..errors import ObjectNotFound, ObjectTruncated, OriginAccessDenied, OriginError, OriginUnavailable
from ._base import ObjectInfo, ProgressFn
from ._http import RangeClient

#: Presigned GET URLs are cached per key for this long (they are valid for twice as long).
PRESIGN_REUSE_S = 600

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


def map_error(exc: BaseException, what: str) -> OriginError:
    """Translate a botocore/aiohttp/OS error into p2pfs's origin error tree."""
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".rstrip()
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(msg)
        if code in _DENIED or status == 403:
            return OriginAccessDenied(msg + " (check AWS credentials)")
        if code == "InvalidRange" or status == 416:
            return ObjectTruncated(msg + " (range past the object's end: it changed since it "
                                   "was indexed)")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return OriginUnavailable(msg)
        return OriginError(msg)
    if isinstance(exc, bx.NoCredentialsError):
        return OriginAccessDenied(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY, a profile, or anonymous = true)")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionError, bx.HTTPClientError,
                        bx.ConnectTimeoutError, bx.ReadTimeoutError, aiohttp.ClientError,
                        asyncio.TimeoutError, ConnectionError, OSError)):
        return OriginUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bx.BotoCoreError):
        return OriginError(f"{what}: {exc}")
    raise exc


class S3Origin:
    """One bucket. Create with `await S3Origin.create(bucket, cfg)` inside a trio-asyncio loop."""

    def __init__(self, bucket: str, cfg: S3Config, client: Any, client_cm: Any) -> None:
        self.bucket = bucket
        self.cfg = cfg
        self.name = f"s3://{bucket}"
        self._client = client
        self._client_cm = client_cm
        self._fast = RangeClient(connect_timeout=cfg.connect_timeout,
                                 request_timeout=cfg.request_timeout) if cfg.fast_get else None
        self._presigned: dict[str, tuple[str, float]] = {}

    @classmethod
    async def create(cls, bucket: str, cfg: S3Config, *, pool_size: int = 64) -> "S3Origin":
        boto_cfg = BotoConfig(
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.request_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=pool_size,
            s3={"addressing_style": "path" if cfg.path_style else "auto"},
            signature_version=UNSIGNED if cfg.anonymous else None,
        )

        async def open_client() -> Any:
            session = get_session()
            cm = session.create_client(
                "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or None, config=boto_cfg
            )
            return cm, await cm.__aenter__()

        try:
            cm, client = await trio_asyncio.aio_as_trio(open_client)()
        except Exception as exc:
            raise map_error(exc, f"s3://{bucket}") from exc
        return cls(bucket, cfg, client, cm)

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await trio_asyncio.aio_as_trio(fn)(*args)
        except OriginError:
            raise
        except Exception as exc:
            raise map_error(exc, what) from exc

    # -- reads ----------------------------------------------------------------------------
    async def _presign(self, key: str) -> str:
        """A presigned GET URL for `key`, signed through botocore's credential chain (so
        refreshed credentials are picked up), reused for a while."""
        now = trio.current_time()
        hit = self._presigned.get(key)
        if hit and hit[1] > now:
            return hit[0]
        url = await self._call(f"{self.name}/{key}", lambda: self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=2 * PRESIGN_REUSE_S))
        if len(self._presigned) > 10000:
            self._presigned.clear()
        self._presigned[key] = (url, now + PRESIGN_REUSE_S)
        return url

    async def get_range(self, key: str, offset: int, length: int, *,
                        timeout: float | None = None) -> bytes | memoryview:
        if length == 0:
            return b""
        if self._fast is not None:
            what = f"{self.name}/{key}@{offset}+{length}"
            return await self._fast.get_range(await self._presign(key), offset, length,
                                              what=what, timeout=timeout)
        if timeout is not None:
            with trio.move_on_after(timeout):
                return await self.get_range(key, offset, length)
            raise OriginUnavailable(f"{self.name}/{key}@{offset}+{length}: no response within {timeout:.1f}s")

        async def get() -> bytes:
            resp = await self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            async with resp["Body"] as body:
                return await body.read()

        data = await self._call(f"{self.name}/{key}@{offset}+{length}", get)
        if len(data) != length:
            raise ObjectTruncated(
                f"{self.name}/{key}: short read at {offset} ({len(data)} of {length} bytes; "
                "the object changed since it was indexed)"
            )
        return data

    async def get_range_into(self, key: str, offset: int, dest: memoryview, *,
                             timeout: float | None = None) -> None:
        if len(dest) == 0:
            return
        if self._fast is not None:
            what = f"{self.name}/{key}@{offset}+{len(dest)}"
            await self._fast.get_range_into(await self._presign(key), offset, dest, what=what,
                                            timeout=timeout)
            return
        dest[:] = await self.get_range(key, offset, len(dest), timeout=timeout)

    async def get(self, key: str) -> bytes:
        async def get() -> bytes:
            resp = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read()

        return await self._call(f"{self.name}/{key}", get)

    async def head(self, key: str) -> ObjectInfo:
        async def head() -> ObjectInfo:
            r = await self._client.head_object(Bucket=self.bucket, Key=key)
            return ObjectInfo(key, int(r["ContentLength"]), r.get("ETag", "").strip('"'))

        return await self._call(f"{self.name}/{key}", head)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        async def list_all() -> list[ObjectInfo]:
            out = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            async for page in pages:
                for o in page.get("Contents", []):
                    out.append(ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"')))
            return sorted(out, key=lambda o: o.key)

        return await self._call(f"{self.name}/{prefix}", list_all)

    # -- writes ---------------------------------------------------------------------------
    async def put(self, key: str, data: bytes) -> None:
        async def put() -> None:
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

        await self._call(f"{self.name}/{key}", put)

    async def create_bucket(self) -> None:
        """Create the bucket if it does not exist (used by the demo and tests)."""
        async def create() -> None:
            try:
                await self._client.create_bucket(Bucket=self.bucket)
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        await self._call(self.name, create)

    async def upload_file(self, key: str, path: Path, progress: ProgressFn | None = None) -> None:
        """Upload a file; multipart with parallel parts when it is bigger than one part."""
        size = path.stat().st_size
        part = self.cfg.upload_part_size
        if size <= part:
            data = await trio.to_thread.run_sync(path.read_bytes)
            await self.put(key, data)
            if progress:
                progress(size)
            return
        what = f"{self.name}/{key}"
        created = await self._call(
            what, lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=key))
        upload_id = created["UploadId"]
        nparts = math.ceil(size / part)
        etags: list[str | None] = [None] * nparts
        limiter = trio.CapacityLimiter(self.cfg.upload_concurrency)

        async def send(i: int) -> None:
            async with limiter:
                def read() -> bytes:
                    with open(path, "rb") as f:
                        f.seek(i * part)
                        return f.read(part)

                data = await trio.to_thread.run_sync(read)
                r = await self._call(what, lambda: self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=data))
                etags[i] = r["ETag"]
                if progress:
                    progress(len(data))

        try:
            async with trio.open_nursery() as nursery:
                for i in range(nparts):
                    nursery.start_soon(send, i)
            parts = [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]
            await self._call(what, lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self._call(what, lambda: self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id))
                except OriginError:
                    pass
            raise

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        await trio_asyncio.aio_as_trio(self._client_cm.__aexit__)(None, None, None)
