"""HTTP/1.1 over trio streams with h11: read a bounded request, write a response, close a
connection so the client reads the answer, and send one request to a replica. h11 keeps the
protocol state; this module moves bytes, enforces the size limits where the bytes arrive,
and maps h11/OS errors to ours (ProtocolError with the status to answer, ReplicaUnavailable).
Timeouts are the caller's (the proxy knows which phase it is waiting for)."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from ._errors import ProtocolError, ReplicaTimeout, ReplicaUnavailable

READ_SIZE = 64 * 1024
#: Headers that belong to one connection, not to the message (RFC 9110 7.6.1), plus the
#: ones we always set ourselves (content-length: we send what we buffered; host: the
#: replica's). Never forwarded either way, nor the headers `Connection` names.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length"})

Headers = list[tuple[bytes, bytes]]


@dataclass
class Message:
    """A request (method, target set) or a response (status set), body read in full."""

    headers: Headers
    body: bytes
    method: bytes = b""
    target: bytes = b""
    status: int = 0


def forwardable(headers: Headers) -> Headers:
    named = {token.strip().lower() for k, v in headers if k.lower() == b"connection"
             for token in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def _event(conn: h11.Connection) -> object:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProtocolError(str(exc), status=exc.error_status_hint) from exc


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = _event(conn)
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(READ_SIZE))


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise ProtocolError(f"body larger than {limit} bytes", status=413)
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        elif isinstance(event, h11.ConnectionClosed):
            raise ProtocolError("connection closed mid-body")
        else:
            raise ProtocolError(f"unexpected {type(event).__name__}")


# ----------------------------------------------------------------------------- server side

async def wait_for_request(conn: h11.Connection, stream: trio.abc.Stream, *,
                           max_head: int) -> bool:
    """Until a byte of the next request is here (True), or the client closed (False).
    Nothing of a request has arrived while this waits: the connection is idle."""
    data, closed = conn.trailing_data
    if data or closed:
        return bool(data)
    data = await stream.receive_some(max_head)
    conn.receive_data(data)
    return bool(data)


async def read_head(conn: h11.Connection, stream: trio.abc.Stream, *,
                    max_head: int) -> h11.Request:
    """The next request's head. More than `max_head` bytes before its blank line is a 431,
    found without reading past the limit; broken HTTP is a 400."""
    # h11 keeps an incomplete head whole in its buffer: what it holds is what we fed it.
    buffered = len(conn.trailing_data[0])
    while True:
        event = _event(conn)
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            raise ProtocolError(f"expected a request, got {type(event).__name__}")
        if buffered >= max_head:
            raise ProtocolError(f"request head larger than {max_head} bytes", status=431)
        data = await stream.receive_some(max_head - buffered)
        buffered += len(data)
        conn.receive_data(data)


async def read_body(conn: h11.Connection, stream: trio.abc.Stream, head: h11.Request, *,
                    max_body: int) -> bytes:
    """The body of the request `head` began; a declared length over `max_body` is refused
    (413) before a byte of it is read (and without a 100 Continue to a client that asked
    for one), a chunked body as soon as it passes the limit."""
    for k, v in head.headers:
        if k == b"content-length" and int(v) > max_body:  # h11 has checked it is digits
            raise ProtocolError(f"body larger than {max_body} bytes", status=413)
    if conn.they_are_waiting_for_100_continue:
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    return await _read_body(conn, stream, max_body)


def simple(status: int, text: str, extra: Headers | None = None) -> tuple[int, Headers, bytes]:
    return status, [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])], \
        text.encode()


async def write_response(conn: h11.Connection, stream: trio.abc.Stream, status: int,
                         headers: Headers, body: bytes, *, close: bool = False) -> None:
    """Send one response. `headers` may be a replica's: its hop-by-hop ones are dropped.
    With `close`, the response says so and h11 ends the connection after it."""
    headers = [*forwardable(headers), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def close_gracefully(stream: trio.SocketStream, *, linger: float) -> None:
    """Half-close, then discard what the client still sends until it closes or `linger`
    seconds pass. Closing a socket with unread input sends a reset, and a reset can make
    the client drop our answer unread (a 413 sent while it is still sending its body)."""
    try:
        await stream.send_eof()
        with trio.move_on_after(linger):
            while await stream.receive_some(READ_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


# ----------------------------------------------------------------------------- client side

async def exchange(host: str, port: int, req: Message, *, connect_timeout: float,
                   timeout: float, max_body: int) -> Message:
    """Send one request on a fresh connection and read the whole response.

    ReplicaUnavailable: no response byte arrived (connect refused, reset, closed) -- the
    request may be retried elsewhere. ReplicaTimeout: no full answer within `timeout`.
    ProtocolError: the replica answered with broken or oversized HTTP.
    """
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise ReplicaUnavailable(f"connect {host}:{port}: {exc!r}") from exc
    got_response = False
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [(k, v) for k, v in forwardable(req.headers) if k.lower() != b"host"]
        headers = [(b"host", f"{host}:{port}".encode()), *headers,
                   (b"content-length", str(len(req.body)).encode()), (b"connection", b"close")]
        try:
            with trio.fail_after(timeout):
                data = conn.send(h11.Request(method=req.method, target=req.target,
                                             headers=headers))
                data += conn.send(h11.Data(data=req.body)) if req.body else b""
                data += conn.send(h11.EndOfMessage())
                await stream.send_all(data)
                event = await _next_event(conn, stream)
                while isinstance(event, h11.InformationalResponse):
                    event = await _next_event(conn, stream)
                if not isinstance(event, h11.Response):
                    raise ReplicaUnavailable(f"{host}:{port} closed before answering")
                got_response = True
                body = await _read_body(conn, stream, max_body)
        except trio.TooSlowError as exc:
            raise ReplicaTimeout(f"{host}:{port} did not answer within {timeout}s") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if got_response:
                raise ProtocolError(f"{host}:{port} failed mid-response: {exc!r}") from exc
            raise ReplicaUnavailable(f"{host}:{port}: {exc!r}") from exc
        except ProtocolError as exc:
            if got_response:
                raise
            raise ReplicaUnavailable(f"{host}:{port} broke off: {exc}") from exc
    return Message(headers=list(event.headers), body=body, status=event.status_code)


async def get(host: str, port: int, path: str, *, timeout: float, max_body: int = 1 << 20
              ) -> Message:
    """A GET for probes and tests."""
    req = Message(headers=[], body=b"", method=b"GET", target=path.encode())
    return await exchange(host, port, req, connect_timeout=timeout, timeout=timeout,
                          max_body=max_body)
