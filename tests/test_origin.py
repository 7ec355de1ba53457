"""One test suite that every origin implementation passes: a local directory and a real
SeaweedFS S3 server."""

from __future__ import annotations

import os
import uuid

import pytest
import trio
import trio_asyncio

from p2pfs.config import S3Config
from p2pfs.errors import ObjectNotFound, ObjectTruncated, OriginUnavailable, is_temp_failure
from p2pfs.origin import LocalDirOrigin
from p2pfs.origin._s3 import S3Origin


@pytest.fixture(params=["local", "s3"])
def make_origin(request, tmp_path):
    """A factory of (origin, key prefix); run under trio-asyncio by the test."""
    if request.param == "local":
        async def make():
            return LocalDirOrigin(tmp_path)
    else:
        endpoint = request.getfixturevalue("seaweed").endpoint

        async def make():
            return await S3Origin.create("models", S3Config(endpoint_url=endpoint))
    return make


def run(fn):
    async def main():
        async with trio_asyncio.open_loop():
            await fn()
    trio.run(main)


def test_origin_contract(make_origin, tmp_path):
    prefix = f"t-{uuid.uuid4().hex[:8]}/"

    async def body():
        o = await make_origin()
        try:
            await o.put(prefix + "a/x.bin", b"0123456789")
            assert await o.get(prefix + "a/x.bin") == b"0123456789"
            assert await o.get_range(prefix + "a/x.bin", 3, 4) == b"3456"
            info = await o.head(prefix + "a/x.bin")
            assert info.size == 10 and info.key == prefix + "a/x.bin"
            big = tmp_path / "big.bin"
            big.write_bytes(os.urandom(40 << 20 | 12345))
            seen = []
            await o.upload_file(prefix + "b/big.bin", big, seen.append)
            assert sum(seen) == big.stat().st_size
            assert await o.get_range(prefix + "b/big.bin", 17 << 20, 1 << 20) == \
                big.read_bytes()[17 << 20:18 << 20]
            dest = bytearray(3 << 20)
            await o.get_range_into(prefix + "b/big.bin", 5 << 20 | 7, memoryview(dest))
            assert dest == big.read_bytes()[5 << 20 | 7:8 << 20 | 7]
            keys = [i.key for i in await o.list(prefix)]
            assert keys == [prefix + "a/x.bin", prefix + "b/big.bin"]
            assert await o.list(prefix + "nothing/") == []
            with pytest.raises(ObjectNotFound):
                await o.get(prefix + "missing")
            with pytest.raises(ObjectNotFound):
                await o.head(prefix + "missing")
            with pytest.raises(ObjectNotFound):
                await o.get_range(prefix + "missing", 0, 1)
            with pytest.raises(ObjectNotFound):
                await o.get_range_into(prefix + "missing", 0, memoryview(bytearray(1)))
            # A range past the end is permanent (the object changed since it was indexed),
            # never retried as an outage: both partly past the end and wholly past it.
            for off, n in ((8, 4), (10, 4), (100, 4)):
                with pytest.raises(ObjectTruncated) as exc:
                    await o.get_range(prefix + "a/x.bin", off, n)
                assert not is_temp_failure(exc.value)
                with pytest.raises(ObjectTruncated):
                    await o.get_range_into(prefix + "a/x.bin", off, memoryview(bytearray(n)))
        finally:
            await o.aclose()

    run(body)


def test_unreachable_s3_is_a_transient_origin_error():
    async def body():
        with socket_closed_port() as port:
            o = await S3Origin.create("models", S3Config(endpoint_url=f"http://127.0.0.1:{port}",
                                                         connect_timeout=1, request_timeout=2))
            try:
                with pytest.raises(OriginUnavailable):
                    await o.get_range("k", 0, 10)
            finally:
                await o.aclose()

    run(body)


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *a) -> None:
        pass


class silent_server:
    """A loopback HTTP 'server' that accepts connections and never answers (a stalled store)."""

    def __enter__(self) -> int:
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list = []
        self.stop = False

        def accept() -> None:
            while not self.stop:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                self.conns.append(c)

        threading.Thread(target=accept, daemon=True).start()
        return self.sock.getsockname()[1]

    def __exit__(self, *a) -> None:
        self.stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_stalled_store_is_bounded_by_the_callers_timeout_not_the_request_timeout():
    """A fill receives into client memory and cannot abandon its thread, so the read
    deadline must reach the socket: with a 20 s request timeout and 1 s left of the read
    deadline, a silent store fails the request after ~1 s (issue 12: fills took ~21 s)."""
    async def body():
        with silent_server() as port:
            o = await S3Origin.create("models", S3Config(endpoint_url=f"http://127.0.0.1:{port}",
                                                         connect_timeout=1, request_timeout=20))
            try:
                for call in (lambda: o.get_range("k", 0, 10, timeout=1.0),
                             lambda: o.get_range_into("k", 0, memoryview(bytearray(10)), timeout=1.0)):
                    t0 = trio.current_time()
                    with pytest.raises(OriginUnavailable):
                        await call()
                    assert 0.9 <= trio.current_time() - t0 < 3.0
            finally:
                await o.aclose()

    run(body)
