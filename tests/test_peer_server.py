"""The peer server and client against each other on loopback aliases (127.0.0.5x), and the
client against hostile raw-socket servers: statuses, auth, admission, drain, keep-alive,
timeouts. Everything here is bounded to a few seconds."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time

import pytest
import trio

from p2pfs.errors import (ConfigError, OriginUnavailable, PeerBusy, PeerMiss,
                          PeerProtocolError, PeerUnauthorized, PeerUnavailable)
from p2pfs.metrics import Metrics
from p2pfs.peer import _wire as wire
from p2pfs.peer._auth import Verifier, sign
from p2pfs.peer._client import PeerClient
from p2pfs.peer._server import PeerServer, PeerServerLimits, TokenBucket

TOKEN = b"cluster-token-0123456789"
OTHER = b"another-token-0123456789"
SERVER_HOST = "127.0.0.51"
CLIENT_NODE = "127.0.0.52:7946"
ORIGIN = "s3://models"
MiB = 1024 * 1024


def chunk(size: int, seed: int = 0) -> tuple[bytes, wire.Locator]:
    data = (hashlib.sha256(b"%d" % seed).digest() * (size // 32 + 1))[:size]
    return data, wire.Locator(ORIGIN, f"blob{seed}", 0, 0, size, size, "none",
                              hashlib.sha256(data).hexdigest())


class Owner:
    """A handler: serves `chunks`; refuses other origins; key "fail" fails like a store,
    key "bug" like a bug of ours. `gate`, when set, holds every request until it is set."""

    def __init__(self) -> None:
        self.chunks: dict[str, bytes] = {}
        self.calls = 0
        self.gate: trio.Event | None = None

    def add(self, size: int, seed: int = 0) -> tuple[bytes, wire.Locator]:
        data, loc = chunk(size, seed)
        self.chunks[loc.digest] = data
        return data, loc

    async def __call__(self, req: wire.ChunkRequest) -> tuple[bytes, str]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        loc = req.locator
        if loc.origin != ORIGIN:
            raise wire.RequestError(f"origin {loc.origin} not served", status=403)
        if loc.key == "fail":
            raise OriginUnavailable("the store is down")
        if loc.key == "bug":
            raise ValueError("a bug")
        if loc.digest not in self.chunks:
            raise PeerMiss("no copy")
        return self.chunks[loc.digest], "disk"


async def start(nursery, *, limits: PeerServerLimits = PeerServerLimits(), registry=None,
                handler=True, ready: bool = True) -> tuple[PeerServer, Owner, str]:
    owner = Owner()
    server = PeerServer(SERVER_HOST, 0, verifier=Verifier([TOKEN]),
                        handler=owner if handler else None, registry=registry, limits=limits,
                        ready=ready)
    host, port = await nursery.start(server.serve)
    return server, owner, f"{host}:{port}"


def client(token: bytes = TOKEN, **kw) -> PeerClient:
    return PeerClient(node_id=CLIENT_NODE, token=token, **kw)


async def fetch(c: PeerClient, peer: str, loc: wire.Locator, *, timeout: float = 3.0,
                cached_only: bool = False) -> tuple[bytes, str]:
    buf = bytearray(loc.size)
    source = await c.fetch_into(peer, loc, memoryview(buf), timeout=timeout,
                                cached_only=cached_only)
    return bytes(buf), source


def raw_exchange(addr: str, request: bytes, timeout: float = 3.0) -> tuple[int, dict, bytes]:
    """Send `request` on a fresh connection; (status, headers, body) of the answer."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(headers.get("content-length", 0)):
            more = s.recv(65536)
            if not more:
                break
            body += more
        return int(lines[0].split()[1]), headers, body


def raw_get(addr: str, target: str, *, token: bytes | None = TOKEN, ts: int | None = None,
            method: str = "GET") -> bytes:
    """A request for any target, signed (when `token`) over its spelling as is."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {addr}"]
    if token is not None:
        ts = int(time.time()) if ts is None else ts
        text = target[len(wire.PREFIX):].removesuffix(wire.CACHED_ONLY)
        mac = sign(token, method=method, path=target, locator=text, ts=ts, node=CLIENT_NODE)
        lines += [f"X-P2PFS-Node: {CLIENT_NODE}", f"X-P2PFS-Time: {ts}", f"X-P2PFS-Auth: {mac}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw(addr: str, request: bytes) -> tuple[int, dict, bytes]:
    return await trio.to_thread.run_sync(raw_exchange, addr, request)


# ----------------------------------------------------------------------------- answers

async def test_round_trip_many_pieces_and_source(nursery):
    server, owner, addr = await start(nursery)
    data, loc = owner.add(3 * MiB + 17)
    c = client()
    got, source = await fetch(c, addr, loc)
    assert got == data and source == "disk"
    bigger = bytearray(loc.size + 100)  # a pooled buffer larger than the chunk
    await c.fetch_into(addr, loc, memoryview(bigger), timeout=3)
    assert bytes(bigger[:loc.size]) == data and bigger[loc.size:] == bytes(100)
    s = server.stats()
    assert s.requests == {"ok": 2} and s.bytes_sent == 2 * loc.size and s.active == 0
    c.close()


@pytest.mark.parametrize("case", ["no token", "stale", "wrong token", "tampered"])
async def test_unauthorized_gets_401_empty_and_never_reaches_the_handler(nursery, case):
    server, owner, addr = await start(nursery)
    _, loc = owner.add(1000)
    target = wire.request_target(loc, cached_only=False)
    request = {
        "no token": raw_get(addr, target, token=None),
        "stale": raw_get(addr, target, ts=int(time.time()) - 120),
        "wrong token": raw_get(addr, target, token=OTHER),
        "tampered": raw_get(addr, target).replace(b"offset=0", b"offset=1"),
    }[case]
    status, headers, body = await raw(addr, request)
    assert (status, body) == (401, b"")
    assert headers["content-length"] == "0" and headers["connection"] == "close"
    assert set(headers) == {"content-length", "connection"}  # nothing else said
    assert owner.calls == 0 and server.stats().requests == {"unauthorized": 1}


async def test_client_raises_peer_unauthorized(nursery):
    _, owner, addr = await start(nursery)
    _, loc = owner.add(1000)
    with pytest.raises(PeerUnauthorized) as exc:
        await fetch(client(OTHER), addr, loc)
    assert exc.value.peer == addr
    with pytest.raises(PeerUnauthorized):  # our clock 2 minutes off
        await fetch(client(clock=lambda: time.time() - 120), addr, loc)
    assert owner.calls == 0


async def test_refusals_map_to_peer_errors(nursery, caplog):
    server, owner, addr = await start(nursery)
    c = client()
    _, loc = chunk(1000, seed=9)
    with pytest.raises(PeerMiss):  # 404: cached_only and no copy
        await fetch(c, addr, loc, cached_only=True)
    with pytest.raises(PeerMiss):  # 403: another origin
        await fetch(c, addr, wire.Locator("s3://elsewhere", *list(vars_of(loc))[1:]))
    with pytest.raises(PeerUnavailable, match="502"):
        await fetch(c, addr, wire.Locator(ORIGIN, "fail", *list(vars_of(loc))[2:]))
    with pytest.raises(PeerUnavailable, match="500"):
        await fetch(c, addr, wire.Locator(ORIGIN, "bug", *list(vars_of(loc))[2:]))
    assert "peer request for chunk" in caplog.text and "ValueError: a bug" in caplog.text
    assert server.stats().requests == {"miss": 1, "forbidden": 1, "failed": 1, "error": 1}
    assert c.connects == 1  # refusals keep the connection
    c.close()


def vars_of(loc: wire.Locator) -> tuple:
    return (loc.origin, loc.key, loc.blob, loc.offset, loc.length, loc.size, loc.compression,
            loc.digest)


async def test_malformed_and_oversized_requests(nursery):
    server, owner, addr = await start(nursery)
    _, loc = owner.add(1000)
    target = wire.request_target(loc, cached_only=False)
    status, _, body = await raw(addr, raw_get(addr, target.replace("size=1000", f"size={65 * MiB}")))
    assert status == 413 and b"size" in body
    status, _, _ = await raw(addr, raw_get(addr, target.replace("blob=0", "blob=00")))
    assert status == 400
    status, _, _ = await raw(addr, raw_get(addr, target, method="POST"))
    assert status == 405
    status, _, _ = await raw(addr, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
    assert status == 431
    status, _, _ = await raw(addr, b"NOT HTTP\r\n\r\n")
    assert status == 400
    assert owner.calls == 0


# ----------------------------------------------------------------------------- admission, drain

async def test_admission_queue_full_is_503_retry_after(nursery):
    """max_uploads + upload_queue requests in progress (here both waiting in the handler,
    which holds no send slot); the next one is refused at once."""
    limits = PeerServerLimits(max_uploads=1, upload_queue=1, retry_after=7)
    server, owner, addr = await start(nursery, limits=limits)
    data, loc = owner.add(1000)
    owner.gate = trio.Event()
    c = client()
    results: list[bytes] = []

    async def one() -> None:
        results.append((await fetch(c, addr, loc))[0])

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
        with trio.fail_after(3):
            while (server.stats().active, server.stats().queued) != (0, 2):
                await trio.sleep(0.01)
        with pytest.raises(PeerBusy) as exc:
            await fetch(c, addr, loc)
        assert exc.value.retry_after == 7.0 and owner.calls == 2
        owner.gate.set()
    assert results == [data, data]
    assert server.stats().requests == {"busy": 1, "ok": 2}


async def test_a_request_waits_for_a_send_slot_at_most_queue_timeout(nursery):
    """One answer is being sent (to a client that reads nothing, under a rate cap); the
    next request's handler is done at once but waits for the only send slot, and is
    refused after queue_timeout."""
    limits = PeerServerLimits(max_uploads=1, upload_queue=4, queue_timeout=0.2,
                              upload_rate=256 * 1024)
    server, owner, addr = await start(nursery, limits=limits)
    _, big = owner.add(8 << 20, seed=1)
    _, small = owner.add(1000)
    target = wire.request_target(big, cached_only=False)
    host, _, port = addr.rpartition(":")
    hog = socket.create_connection((host, int(port)))
    try:
        hog.sendall(raw_get(addr, target))
        with trio.fail_after(3):
            while server.stats().active != 1:
                await trio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(PeerBusy):
            await fetch(client(), addr, small)
        assert 0.15 < time.monotonic() - t0 < 1.5
    finally:
        hog.close()
    with trio.fail_after(15):
        while server.stats().active:
            await trio.sleep(0.05)


async def test_drain_refuses_and_fails_healthz(nursery):
    server, owner, addr = await start(nursery, ready=False)
    data, loc = owner.add(1000)
    assert (await raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[:1] == (503,)
    server.set_ready(True)
    assert (await raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    owner.gate = trio.Event()
    got = []

    async def first() -> None:
        got.append((await fetch(client(), addr, loc))[0])

    async with trio.open_nursery() as n:
        n.start_soon(first)
        with trio.fail_after(3):
            while server.stats().queued != 1:  # in the handler
                await trio.sleep(0.01)
        server.drain()
        status, _, body = await raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (503, b"draining\n")
        with pytest.raises(PeerBusy):
            await fetch(client(), addr, loc)
        with trio.move_on_after(0.1):
            await server.wait_drained()
            pytest.fail("drained with an answer in progress")
        owner.gate.set()
        with trio.fail_after(3):
            await server.wait_drained()
    assert got == [data]  # the answer in progress was finished
    assert server.stats().requests == {"draining": 1, "ok": 1}


async def test_upload_rate_cap(nursery):
    rate = 8 * MiB
    server, owner, addr = await start(nursery, limits=PeerServerLimits(upload_rate=rate))
    _, loc = owner.add(4 * MiB)
    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        for _ in range(2):  # the cap holds across uploads
            n.start_soon(fetch, client(), addr, loc)
    elapsed = time.monotonic() - t0
    assert elapsed >= (8 * MiB - rate / 10) / rate * 0.95, elapsed
    assert elapsed < 3


def test_token_bucket_never_exceeds_its_rate():
    b = TokenBucket(rate=100.0, burst=10.0)
    assert b.reserve(10, now=0.0) == 0.0          # the burst
    assert b.reserve(50, now=0.0) == pytest.approx(0.5)
    assert b.reserve(50, now=0.0) == pytest.approx(1.0)  # behind the previous debt
    assert b.reserve(10, now=2.0) == pytest.approx(0.0)  # 200 tokens back, capped at 10
    assert b.reserve(0, now=1e6) == 0.0 and b.reserve(11, now=1e6) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- connections

async def test_keep_alive_one_connection_for_many_requests(nursery):
    server, owner, addr = await start(nursery)
    chunks = [owner.add(10_000 + i, seed=i) for i in range(20)]
    c = client()
    for data, loc in chunks:
        assert (await fetch(c, addr, loc))[0] == data
    assert c.connects == 1 and server.stats().connections == 1
    c.close()


async def test_a_connection_the_server_closed_while_idle_is_retried(nursery):
    server, owner, addr = await start(nursery, limits=PeerServerLimits(idle_timeout=0.2))
    data, loc = owner.add(1000)
    c = client()
    await fetch(c, addr, loc)
    await trio.sleep(0.5)  # the server drops the idle connection
    assert server.stats().open_connections == 0
    assert (await fetch(c, addr, loc))[0] == data
    assert c.connects == 2


async def test_head_timeout_and_connection_limit(nursery):
    limits = PeerServerLimits(head_timeout=0.3, max_connections=1)
    server, _, addr = await start(nursery, limits=limits)

    def slow_client() -> tuple[float, bytes, bytes]:
        with socket.create_connection((SERVER_HOST, int(addr.rpartition(":")[2])), timeout=3) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
            time.sleep(0.05)
            with socket.create_connection((SERVER_HOST, int(addr.rpartition(":")[2])),
                                          timeout=3) as second:
                refused = second.recv(100)  # over max_connections: closed at once
            t0 = time.monotonic()
            answer = s.recv(100)  # the server drops it at head_timeout
            return time.monotonic() - t0, answer, refused

    waited, answer, refused = await trio.to_thread.run_sync(slow_client)
    assert answer == b"" and refused == b"" and waited < 1.5
    assert server.stats().refused_connections == 1


async def test_a_client_hanging_up_mid_body_leaves_the_server_serving(nursery):
    server, owner, addr = await start(nursery)
    data, loc = owner.add(8 * MiB)
    host, _, port = addr.rpartition(":")

    def hang_up() -> None:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.sendall(raw_get(addr, wire.request_target(loc, cached_only=False)))
            s.recv(1000)

    await trio.to_thread.run_sync(hang_up)
    assert (await fetch(client(), addr, loc))[0] == data


async def test_metrics_and_unknown_paths(nursery):
    metrics = Metrics()
    metrics.reads = 5
    server, _, addr = await start(nursery, registry=metrics.registry, handler=False)
    status, headers, body = await raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"p2pfs_reads_total 5.0" in body
    assert (await raw(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 405
    assert (await raw(addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
    _, loc = chunk(10)  # no handler: no chunk route
    assert (await raw(addr, raw_get(addr, wire.request_target(loc, cached_only=False))))[0] == 404


async def test_bind_errors_are_config_errors():
    with socket.socket() as busy:
        busy.bind((SERVER_HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve peers at {SERVER_HOST}:{port}: "
                                              "Address already in use"):
            await PeerServer(SERVER_HOST, port).bind()
    with pytest.raises(ConfigError, match="Cannot assign requested address"):
        await PeerServer("192.0.2.1", 7946, name="metrics").bind()


# ----------------------------------------------------------------------------- hostile peers

@contextlib.contextmanager
def raw_server(reply: bytes | None):
    """A listener on 127.0.0.53 whose connections get `reply` once a request arrived (None:
    never answered: a stalled peer), then stay open until the test ends."""
    lsock = socket.create_server(("127.0.0.53", 0))
    stop = threading.Event()
    conns: list[socket.socket] = []

    def run() -> None:
        lsock.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            conn.recv(65536)
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.53:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in conns:
            conn.close()
        lsock.close()


async def test_a_stalled_peer_ends_within_the_timeout():
    _, loc = chunk(1000)
    with raw_server(None) as addr:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no complete answer") as exc:
            await fetch(client(), addr, loc, timeout=0.5)
        assert 0.45 < time.monotonic() - t0 < 1.2 and exc.value.peer == addr
    # stalled mid-body: the head and half the bytes, then nothing
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-p2pfs-source: disk\r\n\r\n"
    with raw_server(head + b"x" * 500) as addr:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            await fetch(client(), addr, loc, timeout=0.5)
        assert time.monotonic() - t0 < 1.2


async def test_a_trickling_peer_cannot_stretch_the_deadline():
    _, loc = chunk(1000)
    lsock = socket.create_server(("127.0.0.53", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n":
                if stop.wait(0.1):
                    return
                conn.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no complete answer"):
            await fetch(client(), f"127.0.0.53:{lsock.getsockname()[1]}", loc, timeout=0.6)
        assert time.monotonic() - t0 < 1.1
    finally:
        stop.set()
        thread.join(3)
        lsock.close()


@pytest.mark.parametrize("reply", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 999\r\nx-p2pfs-source: disk\r\n\r\n" + b"x" * 999,
    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-p2pfs-source: moon\r\n\r\n" + b"x" * 1000,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-p2pfs-source: disk\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-p2pfs-source: disk\r\n\r\n" + b"x" * 1001,
    b"HTTP/1.1 302 Found\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * 20000 + b"\r\n\r\n",
], ids=["garbage", "wrong length", "unknown source", "chunked", "extra bytes", "redirect",
        "huge head"])
async def test_an_answer_that_breaks_the_protocol(reply):
    _, loc = chunk(1000)
    with raw_server(reply) as addr:
        with pytest.raises(PeerProtocolError) as exc:
            await fetch(client(), addr, loc, timeout=1)
        assert exc.value.peer == addr


async def test_a_body_cut_short_lowers_health_but_is_no_ban():
    """A peer that dies mid-answer sent nothing wrong: PeerUnavailable, not a ban."""
    _, loc = chunk(1000)
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-p2pfs-source: disk\r\n\r\n"
    lsock = socket.create_server(("127.0.0.53", 0))

    def serve_once() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(head + b"x" * 500)  # then close

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(PeerUnavailable, match="cut short at 500"):
            await fetch(client(), f"127.0.0.53:{lsock.getsockname()[1]}", loc)
    finally:
        thread.join(3)
        lsock.close()


async def test_a_closed_port_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.54", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
    _, loc = chunk(1000)
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable, match="cannot connect"):
        await fetch(client(), f"127.0.0.54:{port}", loc)
    assert time.monotonic() - t0 < 0.5


async def test_connections_come_from_the_nodes_own_address():
    _, loc = chunk(1000)
    lsock = socket.create_server(("127.0.0.53", 0))
    seen = []

    def serve_once() -> None:
        conn, peer = lsock.accept()
        seen.append(peer[0])
        conn.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(PeerUnavailable):  # closed before answering
            await fetch(client(), f"127.0.0.53:{lsock.getsockname()[1]}", loc)
    finally:
        thread.join(3)
        lsock.close()
    assert seen == [CLIENT_NODE.partition(":")[0]]


async def test_metrics_serve_binds_first_and_stops_with_its_block():
    from p2pfs import metrics as metrics_mod

    m = Metrics()
    m.read_bytes = 123
    async with metrics_mod.serve(m, SERVER_HOST, 0) as (host, port):
        status, _, body = await raw(f"{host}:{port}", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b"p2pfs_read_bytes_total 123.0" in body
        with pytest.raises(ConfigError, match=f"cannot serve metrics at {host}:{port}: "
                                              "Address already in use"):
            async with metrics_mod.serve(m, host, port):
                pass
    with pytest.raises(OSError):  # closed with the block
        raw_exchange(f"{host}:{port}", b"GET /metrics HTTP/1.1\r\n\r\n")
    if socket.has_ipv6:
        async with metrics_mod.serve(m, "::1", 0) as (host, port):
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            assert (await raw(f"{host}:{port}", request))[0] == 200


async def test_an_owner_fetching_slowly_keeps_its_requester_with_102s():
    """An owner whose own fetch takes longer than the requester's stall timeout sends
    102 Processing meanwhile: the request succeeds instead of falling back (a storm)."""
    async with trio.open_nursery() as nursery:
        _, owner, addr = await start(nursery, limits=PeerServerLimits(progress_interval=0.1))
        data, loc = owner.add(1000)
        owner.gate = trio.Event()
        nursery.start_soon(_open_gate_after, owner, 1.0)
        buf = bytearray(loc.size)
        t0 = trio.current_time()
        await client().fetch_into(addr, loc, memoryview(buf), timeout=0.4, total=5.0)
        assert bytes(buf) == data and trio.current_time() - t0 >= 0.9
        # Without progress the same wait is a stall: PeerUnavailable at the stall timeout.
        owner.gate = trio.Event()
        nursery.start_soon(_open_gate_after, owner, 1.5)
        _, quiet, quiet_addr = await start(nursery, limits=PeerServerLimits(progress_interval=0))
        quiet.add(1000)
        quiet.gate = trio.Event()
        t0 = trio.current_time()
        with pytest.raises(PeerUnavailable):
            await client().fetch_into(quiet_addr, loc, memoryview(buf), timeout=0.4, total=5.0)
        assert trio.current_time() - t0 < 1.0
        quiet.gate.set()
        nursery.cancel_scope.cancel()


async def _open_gate_after(owner, seconds: float) -> None:
    await trio.sleep(seconds)
    owner.gate.set()
