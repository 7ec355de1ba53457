"""HTTP/1.1 over trio streams with h11: read a bounded request, write a response, and
send one request to a replica. h11 keeps the protocol state; this module only moves
bytes and maps h11/OS errors to ours (ProtocolError, ReplicaUnavailable)."""

from __future__ import annotations

from dataclasses import dataclass

import h11
import trio

from ._errors import ProtocolError, ReplicaTimeout, ReplicaUnavailable

READ_SIZE = 64 * 1024
#: Headers that belong to one connection, not to the request (RFC 9110 7.6.1).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"content-length"}


@dataclass
class Message:
    """A request (method, target set) or a response (status set), body read in full."""

    headers: list[tuple[bytes, bytes]]
    body: bytes
    method: bytes = b""
    target: bytes = b""
    status: int = 0


def forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = {v.strip().lower() for k, v in headers if k.lower() == b"connection"
             for v in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(READ_SIZE)
        conn.receive_data(data)


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise ProtocolError(f"body larger than {limit} bytes")
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        elif isinstance(event, h11.ConnectionClosed):
            raise ProtocolError("connection closed mid-body")
        else:
            raise ProtocolError(f"unexpected {type(event).__name__}")


async def read_request(conn: h11.Connection, stream: trio.abc.Stream, *,
                       max_body: int) -> Message | None:
    """The next request on a server connection; None when the client closed cleanly.
    Raises ProtocolError (bad HTTP, too large) and whatever the stream raises."""
    try:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise ProtocolError(f"expected a request, got {type(event).__name__}")
        length = next((int(v) for k, v in event.headers if k == b"content-length"), 0)
        if length > max_body:
            raise ProtocolError(f"body larger than {max_body} bytes")
        body = await _read_body(conn, stream, max_body)
    except h11.RemoteProtocolError as exc:
        raise ProtocolError(str(exc)) from exc
    return Message(headers=list(event.headers), body=body, method=event.method,
                   target=event.target)


async def write_response(conn: h11.Connection, stream: trio.abc.Stream, status: int,
                         headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*forwardable(headers), (b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


def simple(status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
           ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])], \
        text.encode()


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
        except h11.RemoteProtocolError as exc:
            if got_response:
                raise ProtocolError(f"{host}:{port}: {exc}") from exc
            raise ReplicaUnavailable(f"{host}:{port} broke off: {exc}") from exc
    return Message(headers=list(event.headers), body=body, status=event.status_code)


async def get(host: str, port: int, path: str, *, timeout: float, max_body: int = 1 << 20
              ) -> Message:
    """A GET for probes and tests."""
    req = Message(headers=[], body=b"", method=b"GET", target=path.encode())
    return await exchange(host, port, req, connect_timeout=timeout, timeout=timeout,
                          max_body=max_body)
