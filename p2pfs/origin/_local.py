"""An origin backed by a local directory: same contract as S3, for tests and offline use."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from ..errors import ObjectNotFound, ObjectTruncated, OriginError, OriginUnavailable
from ._base import ObjectInfo, ProgressFn


class LocalDirOrigin:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.name = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise OriginError(f"invalid key {key!r}")
        return self.root / key

    async def get_range(self, key: str, offset: int, length: int, *,
                        timeout: float | None = None) -> bytes:  # local reads do not stall
        def read() -> bytes:
            with _mapped(key), open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, offset)

        data = await trio.to_thread.run_sync(read)
        if len(data) != length:
            raise ObjectTruncated(f"{key}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    async def get_range_into(self, key: str, offset: int, dest: memoryview, *,
                             timeout: float | None = None) -> None:
        def read() -> int:
            with _mapped(key), open(self._path(key), "rb", buffering=0) as f:
                got = 0
                while got < len(dest):
                    n = os.preadv(f.fileno(), [dest[got:]], offset + got)
                    if n == 0:
                        break
                    got += n
                return got

        got = await trio.to_thread.run_sync(read)
        if got != len(dest):
            raise ObjectTruncated(f"{key}: short read at {offset} ({got} of {len(dest)} bytes)")

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            with _mapped(key):
                return self._path(key).read_bytes()

        return await trio.to_thread.run_sync(read)

    async def head(self, key: str) -> ObjectInfo:
        def stat() -> ObjectInfo:
            with _mapped(key):
                p = self._path(key)
                if not p.is_file():
                    raise FileNotFoundError(key)
                st = p.stat()
                return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

        return await trio.to_thread.run_sync(stat)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out = []
            if not self.root.is_dir():
                raise OriginUnavailable(f"{self.name}: not a directory")
            for dirpath, _, files in os.walk(self.root):
                for fn in files:
                    p = Path(dirpath, fn)
                    key = p.relative_to(self.root).as_posix()
                    if key.startswith(prefix) and not fn.startswith(".p2pfs-tmp"):
                        st = p.stat()
                        out.append(ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}"))
            return sorted(out, key=lambda o: o.key)

        return await trio.to_thread.run_sync(walk)

    async def put(self, key: str, data: bytes) -> None:
        def write() -> None:
            with _mapped(key):
                p = self._path(key)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f".p2pfs-tmp.{p.name}")
                tmp.write_bytes(data)
                os.replace(tmp, p)

        await trio.to_thread.run_sync(write)

    async def upload_file(self, key: str, path: Path, progress: ProgressFn | None = None) -> None:
        def copy() -> None:
            with _mapped(key):
                dst = self._path(key)
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".p2pfs-tmp.{dst.name}")
                with open(path, "rb") as src, open(tmp, "wb") as out:
                    while block := src.read(8 << 20):
                        out.write(block)
                        if progress:
                            trio.from_thread.run_sync(progress, len(block))
                os.replace(tmp, dst)

        await trio.to_thread.run_sync(copy)

    async def aclose(self) -> None:
        pass


class _mapped:
    """Map OS errors to origin errors."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, et, exc, tb) -> bool:
        if exc is None or isinstance(exc, OriginError):
            return False
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            raise ObjectNotFound(f"{self.key}: no such object") from exc
        if isinstance(exc, OSError):
            raise OriginUnavailable(f"{self.key}: {exc}") from exc
        return False


