"""The peer protocol's rules, without I/O (docs/FORMAT.md, "Peer protocol").

A request asks a peer for one whole chunk by its digest and carries the chunk's locator
(the origin URL, the blob's object key and the chunk's place in it), so an owner that has
not mounted that model can still fetch it:

    GET /v1/chunk/<digest>?origin=<url>&key=<key>&blob=<n>&offset=<n>&length=<n>&size=<n>
        &compression=<none|zstd>[&hash=blake3][&cached_only=1] HTTP/1.1
    X-P2PFS-Node: <requester's node id>
    X-P2PFS-Time: <Unix seconds>
    X-P2PFS-Auth: <hex HMAC-SHA256 (_auth.sign) over method, target, locator, time, node>

The locator text (`Locator.canonical()`, the target after "/v1/chunk/" less the
cached_only flag) has exactly one spelling: fields in that order, decimal integers without
leading zeros, strings percent-encoded with everything but unreserved characters escaped.
A target in any other spelling is refused, so the text a MAC covers is the locator the
owner acts on. `authenticate` checks the MAC from the raw target alone, before anything in
it is believed; `parse_request` then validates every field and bound.

A 200 answer's body is the chunk's plain (decompressed) bytes, exactly `size` of them, with
`X-P2PFS-Source` saying where the owner had them from. `error_for` maps every other answer
to the requester's PeerError (see the STATUS table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import quote, unquote

from ..errors import (PeerBusy, PeerError, PeerMiss, PeerProtocolError, PeerUnauthorized,
                      PeerUnavailable, ProtocolError)
from ..manifest import (CHUNK_HASHES, COMPRESSIONS, MAX_CHUNK_SIZE, MAX_OFF, MAX_STORED_CHUNK,
                        ChunkRef)
from ..plan import ChunkLoc
from ._auth import Unauthorized, Verifier, sign

PREFIX = "/v1/chunk/"
CACHED_ONLY = "&cached_only=1"
FIELDS = ("origin", "key", "blob", "offset", "length", "size", "compression")
#: Fields that may follow FIELDS, absent when they hold their default ("hash": sha256, so
#: that a sha256 chunk's locator is spelled as before BLAKE3 existed).
OPTIONAL = ("hash",)
MAX_ORIGIN_BYTES = 1024
MAX_KEY_BYTES = 1024  # S3's own limit on object keys
MAX_BLOB = 2**32 - 1
MAX_NODE_BYTES = 300  # "[<IPv6 or DNS name>]:<port>"
#: Every valid target is shorter: 1024-byte strings escape to at most 3 bytes per byte.
MAX_TARGET = len(PREFIX) + 64 + 3 * (MAX_ORIGIN_BYTES + MAX_KEY_BYTES) + 200

NODE_HEADER = "x-p2pfs-node"
TIME_HEADER = "x-p2pfs-time"
AUTH_HEADER = "x-p2pfs-auth"
SOURCE_HEADER = "x-p2pfs-source"
SOURCES = ("memory", "disk", "peer", "origin")

#: What each status means, and what the requester raises for it (`error_for`).
STATUS = {
    200: "the chunk's plain bytes; Content-Length = size; X-P2PFS-Source says from where",
    400: "malformed request (PeerUnavailable: our request, not their fault)",
    401: "missing, malformed, stale or wrong MAC; empty body (PeerUnauthorized)",
    403: "the owner does not serve this origin (PeerMiss: ask the next rank)",
    404: "cached_only and the owner has no copy (PeerMiss)",
    405: "not a GET (PeerUnavailable)",
    413: "size or length over the bound (PeerUnavailable)",
    500: "a bug of the owner's (PeerUnavailable)",
    502: "the owner's own fetch failed (PeerUnavailable)",
    503: "busy (upload queue full) or draining; Retry-After in seconds (PeerBusy)",
}

_SHA = re.compile(r"[0-9a-f]{64}")
_INT = re.compile(r"0|[1-9][0-9]{0,18}")
_NODE = re.compile(r"[\x21-\x7e]+")


class RequestError(ProtocolError):
    """A request the server refuses as sent; `status` is the answer (400, 403 or 413)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _text(value: object, what: str, limit: int) -> None:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{what} must be a non-empty string")
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid UTF-8") from None
    if n > limit:
        raise RequestError(f"{what} has {n} bytes, at most {limit}")
    if any(c < " " or c == "\x7f" for c in value):
        raise RequestError(f"{what} holds a control character")


def _int(value: object, what: str, lo: int, hi: int, status: int = 400) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{what} must be an integer")
    if not lo <= value <= hi:
        raise RequestError(f"{what} {value} is outside [{lo}, {hi}]",
                           status=status if value > hi else 400)


@dataclass(frozen=True, slots=True)
class Locator:
    """Where a chunk lives: `origin` is the mount's source URL ("s3://bucket/prefix"),
    `key` the blob's object key, the rest the chunk's ChunkRef fields. Validated when
    made (RequestError): an invalid Locator cannot exist."""

    origin: str
    key: str
    blob: int
    offset: int
    length: int
    size: int
    compression: str
    digest: str
    hash: str = "sha256"

    def __post_init__(self) -> None:
        _text(self.origin, "origin", MAX_ORIGIN_BYTES)
        _text(self.key, "key", MAX_KEY_BYTES)
        _int(self.blob, "blob", 0, MAX_BLOB)
        _int(self.offset, "offset", 0, MAX_OFF)
        _int(self.length, "length", 1, MAX_STORED_CHUNK, status=413)
        _int(self.size, "size", 1, MAX_CHUNK_SIZE, status=413)
        if self.offset + self.length > MAX_OFF:
            raise RequestError("the chunk ends past 2**63")
        if self.compression not in COMPRESSIONS:
            raise RequestError(f"unknown compression {str(self.compression)[:20]!r}")
        if self.compression == "none" and self.length != self.size:
            raise RequestError("an uncompressed chunk's length must equal its size")
        if not isinstance(self.digest, str) or not _SHA.fullmatch(self.digest):
            raise RequestError("the digest must be 64 lowercase hex digits")
        if self.hash not in CHUNK_HASHES:
            raise RequestError(f"unknown chunk hash {str(self.hash)[:20]!r}")

    @classmethod
    def from_loc(cls, origin: str, loc: ChunkLoc) -> Locator:
        r = loc.ref
        return cls(origin, loc.key, r.blob, r.offset, r.length, r.size, r.compression, r.digest,
                   r.hash)

    def to_loc(self) -> ChunkLoc:
        return ChunkLoc(self.key, ChunkRef(self.blob, self.offset, self.length, self.size,
                                           self.compression, self.digest, self.hash))

    def canonical(self) -> str:
        """The one spelling of this locator: the request target after PREFIX."""
        return (f"{self.digest}?origin={quote(self.origin, safe='')}"
                f"&key={quote(self.key, safe='')}&blob={self.blob}&offset={self.offset}"
                f"&length={self.length}&size={self.size}&compression={self.compression}"
                + ("" if self.hash == "sha256" else f"&hash={self.hash}"))


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    locator: Locator
    cached_only: bool
    node: str  # the requester's node id
    ts: int
    mac: str


def request_target(loc: Locator, *, cached_only: bool) -> str:
    """The path and query of a GET for `loc`."""
    return PREFIX + loc.canonical() + (CACHED_ONLY if cached_only else "")


def auth_headers(token: bytes, *, method: str, target: str, locator: Locator, node: str,
                 ts: int) -> list[tuple[str, str]]:
    mac = sign(token, method=method, path=target, locator=locator.canonical(), ts=ts, node=node)
    return [("X-P2PFS-Node", node), ("X-P2PFS-Time", str(ts)), ("X-P2PFS-Auth", mac)]


def _split(target: str) -> tuple[str, bool]:
    """(locator text, cached_only) of a chunk target, by its spelling alone."""
    if not target.startswith(PREFIX):
        raise RequestError("not a chunk target")
    text = target[len(PREFIX):]
    if text.endswith(CACHED_ONLY):
        return text[:-len(CACHED_ONLY)], True
    return text, False


def _as_str(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else v


def _auth_fields(headers: Iterable[tuple[bytes | str, bytes | str]]) -> tuple[str, int, str]:
    """(node, ts, mac) from the headers; Unauthorized unless each is there once, well formed."""
    found: dict[str, str] = {}
    for name, value in headers:
        name = _as_str(name).lower()
        if name in (NODE_HEADER, TIME_HEADER, AUTH_HEADER):
            if name in found:
                raise Unauthorized(f"{name} given twice")
            found[name] = _as_str(value).strip()
    for name in (NODE_HEADER, TIME_HEADER, AUTH_HEADER):
        if name not in found:
            raise Unauthorized(f"missing {name}")
    node, ts, mac = found[NODE_HEADER], found[TIME_HEADER], found[AUTH_HEADER]
    if len(node) > MAX_NODE_BYTES or not _NODE.fullmatch(node):
        raise Unauthorized("malformed node id")
    if not _INT.fullmatch(ts):
        raise Unauthorized("malformed timestamp")
    return node, int(ts), mac


def authenticate(verifier: Verifier, *, method: str, target: str,
                 headers: Iterable[tuple[bytes | str, bytes | str]], now: float) -> None:
    """Raise Unauthorized unless the request's MAC is valid and fresh. Looks at nothing but
    the spelling of the target, so no field of an unauthenticated request is acted on."""
    node, ts, mac = _auth_fields(headers)
    try:
        text, _ = _split(target)
    except RequestError:
        raise Unauthorized("not a chunk target") from None
    verifier.check(method=method, path=target, locator=text, ts=ts, node=node, mac=mac, now=now)


def parse_request(method: str, target: str,
                  headers: Iterable[tuple[bytes | str, bytes | str]]) -> ChunkRequest:
    """The request a target and its headers make, or RequestError (400, or 413 for a size
    over the bound) for anything malformed, out of bounds or not in canonical spelling."""
    if method != "GET":
        raise RequestError(f"method {method[:10]!r} not allowed (GET only)", status=405)
    if len(target) > MAX_TARGET:
        raise RequestError(f"target longer than {MAX_TARGET} characters")
    try:
        node, ts, mac = _auth_fields(headers)
    except Unauthorized as exc:
        raise RequestError(exc.reason) from None
    text, cached_only = _split(target)
    digest, sep, query = text.partition("?")
    if not sep:
        raise RequestError("no query: the locator is missing")
    values: dict[str, str] = {}
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not eq or name not in FIELDS + OPTIONAL:
            raise RequestError(f"unknown query field {name[:20]!r}")
        if name in values:
            raise RequestError(f"query field {name!r} given twice")
        values[name] = value
    missing = [f for f in FIELDS if f not in values]
    if missing:
        raise RequestError(f"missing query field(s) {', '.join(missing)}")
    ints = {}
    for name in ("blob", "offset", "length", "size"):
        if not _INT.fullmatch(values[name]):
            raise RequestError(f"{name} must be a decimal integer")
        ints[name] = int(values[name])
    try:
        origin = unquote(values["origin"], errors="strict")
        key = unquote(values["key"], errors="strict")
    except UnicodeDecodeError:
        raise RequestError("origin or key is not valid UTF-8") from None
    loc = Locator(origin, key, ints["blob"], ints["offset"], ints["length"], ints["size"],
                  values["compression"], digest, values.get("hash", "sha256"))
    if loc.canonical() != text:
        raise RequestError("the locator is not in canonical form (field order, escapes, "
                           "leading zeros)")
    return ChunkRequest(loc, cached_only, node, ts, mac)


def retry_after(value: str | None, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (delta-seconds only), bounded to [0, 3600]."""
    if value is None or not _INT.fullmatch(value.strip()):
        return default
    return float(min(int(value.strip()), 3600))


def error_for(status: int, headers: dict[str, str], *, peer: str) -> PeerError:
    """The PeerError a non-200 answer means (`headers`: lower-case names)."""
    what = f"peer {peer}: HTTP {status}"
    if status == 401:
        return PeerUnauthorized(f"{what}: our cluster token is not theirs", peer=peer)
    if status == 503:
        return PeerBusy(f"{what}: busy or draining", peer=peer,
                        retry_after=retry_after(headers.get("retry-after")))
    if status in (403, 404):
        return PeerMiss(f"{what}: " + ("no copy" if status == 404 else "origin not served"),
                        peer=peer)
    if status in (400, 405, 413, 500, 502, 504):
        return PeerUnavailable(f"{what}: could not serve", peer=peer)
    return PeerProtocolError(f"{what}: not a status of the peer protocol", peer=peer)
