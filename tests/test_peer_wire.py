"""The peer protocol's pure rules (p2pfs/peer/_wire.py): locators, targets, MACs, bounds."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from p2pfs.errors import (PeerBusy, PeerMiss, PeerProtocolError, PeerUnauthorized,
                          PeerUnavailable)
from p2pfs.manifest import MAX_CHUNK_SIZE, MAX_OFF, MAX_STORED_CHUNK, ChunkRef
from p2pfs.peer import _wire as wire
from p2pfs.peer._auth import Unauthorized, Verifier
from p2pfs.plan import ChunkLoc

TOKEN = b"t" * 32
OTHER = b"o" * 32
NODE = "127.0.0.7:7946"
NOW = 1_800_000_000
SHA = "ab" * 32
LOC = wire.Locator("s3://models/prefix", "blobs/0001.bin", 3, 4096, 1000, 2000, "zstd", SHA)


def signed(loc: wire.Locator = LOC, *, cached_only: bool = False, token: bytes = TOKEN,
           ts: int = NOW, method: str = "GET") -> tuple[str, list[tuple[str, str]]]:
    target = wire.request_target(loc, cached_only=cached_only)
    return target, wire.auth_headers(token, method=method, target=target, locator=loc,
                                     node=NODE, ts=ts)


def check(target: str, headers, *, method: str = "GET", now: float = NOW,
          tokens=(TOKEN,)) -> None:
    wire.authenticate(Verifier(tokens, window=30), method=method, target=target,
                      headers=headers, now=now)


@pytest.mark.parametrize("cached_only", [False, True])
def test_round_trip(cached_only):
    target, headers = signed(cached_only=cached_only)
    assert target.startswith(f"/v1/chunk/{SHA}?origin=s3%3A%2F%2Fmodels%2Fprefix&key=blobs%2F")
    check(target, headers)
    req = wire.parse_request("GET", target, headers)
    assert req == wire.ChunkRequest(LOC, cached_only, NODE, NOW, headers[2][1])
    # h11 hands headers over as lower-case bytes
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    check(target, raw)
    assert wire.parse_request("GET", target, raw) == req


def test_from_loc_and_back():
    loc = ChunkLoc("k/blob", ChunkRef(1, 2, 30, 30, "none", SHA))
    got = wire.Locator.from_loc("s3://b", loc)
    assert got.to_loc() == loc and got.origin == "s3://b"


def test_a_blake3_locator_names_its_hash_and_a_sha256_one_is_spelled_as_before():
    b3 = dataclasses.replace(LOC, hash="blake3")
    target, headers = signed(b3)
    assert target.endswith("&compression=zstd&hash=blake3")
    assert "hash=" not in signed()[0]
    assert wire.parse_request("GET", target, headers).locator == b3
    loc = ChunkLoc("k/blob", ChunkRef(1, 2, 30, 30, "none", SHA, "blake3"))
    assert wire.Locator.from_loc("s3://b", loc).to_loc() == loc
    # The default spelled out is not canonical (a MAC covers one spelling), nor is a
    # hash before the other fields; an unknown hash is refused.
    for bad in (signed()[0].replace("&compression=zstd", "&compression=zstd&hash=sha256"),
                target.replace("&compression=zstd&hash=blake3", "&hash=blake3&compression=zstd"),
                target.replace("hash=blake3", "hash=md5")):
        with pytest.raises(wire.RequestError):
            wire.parse_request("GET", bad, headers)


@pytest.mark.parametrize("case", ["no node", "no time", "no mac", "twice", "bad time",
                                  "negative time", "bad node", "bad mac", "stale", "future",
                                  "wrong token", "offset changed", "cached_only added",
                                  "method changed", "node changed", "not a chunk target"])
def test_unauthenticated(case):
    target, headers = signed()
    h = dict(headers)
    if case == "no node":
        del h["X-P2PFS-Node"]
    elif case == "no time":
        del h["X-P2PFS-Time"]
    elif case == "no mac":
        del h["X-P2PFS-Auth"]
    elif case == "bad time":
        h["X-P2PFS-Time"] = "12a"
    elif case == "negative time":
        h["X-P2PFS-Time"] = "-5"
    elif case == "bad node":
        h["X-P2PFS-Node"] = "a b"
    elif case == "bad mac":
        h["X-P2PFS-Auth"] = h["X-P2PFS-Auth"].upper()
    elif case == "node changed":
        h["X-P2PFS-Node"] = "127.0.0.8:7946"
    headers = list(h.items())
    method, now = "GET", NOW
    if case == "twice":
        headers.append(headers[0])
    elif case == "stale":
        now = NOW + 31
    elif case == "future":
        now = NOW - 31
    elif case == "wrong token":
        target, headers = signed(token=OTHER)
    elif case == "offset changed":
        target = target.replace("offset=4096", "offset=4097")
    elif case == "cached_only added":
        target += "&cached_only=1"
    elif case == "method changed":
        method = "POST"
    elif case == "not a chunk target":
        target = "/v2/chunk/x"
    with pytest.raises(Unauthorized):
        check(target, headers, method=method, now=now)


def test_two_tokens_accepted_during_rotation():
    target, headers = signed(token=OTHER)
    check(target, headers, tokens=(TOKEN, OTHER))
    check(target, headers, now=NOW + 30, tokens=(OTHER, TOKEN))  # the window is inclusive


def _replace(**kw) -> None:
    dataclasses.replace(LOC, **kw)


@pytest.mark.parametrize("field,ok,bad,status", [
    ("size", MAX_CHUNK_SIZE, MAX_CHUNK_SIZE + 1, 413),
    ("length", MAX_STORED_CHUNK, MAX_STORED_CHUNK + 1, 413),
    ("size", 1, 0, 400),
    ("length", 1, 0, 400),
    ("blob", 2**32 - 1, 2**32, 400),
    ("blob", 0, -1, 400),
    ("offset", 0, -1, 400),
    ("offset", MAX_OFF - 1000, MAX_OFF - 999, 400),  # the chunk would end past 2**63
    ("origin", "o" * 1024, "o" * 1025, 400),
    ("origin", "é" * 512, "é" * 512 + "x", 400),  # bytes, not characters
    ("key", "k" * 1024, "k" * 1025, 400),
    ("key", "k", "", 400),
    ("key", "a b/ü?&=%", "a\nb", 400),
    ("key", "k", "\ud800", 400),
    ("origin", "s3://b", "s3://b\x7f", 400),
    ("compression", "none", "gzip", 400),
    ("digest", "0" * 64, "A" * 64, 400),
    ("digest", "0" * 64, "0" * 63, 400),
    ("blob", 1, True, 400),
    ("size", 1000, 1000.0, 400),
])
def test_bounds(field, ok, bad, status):
    fix = {"compression": "none", "size": 1000} if field == "compression" and ok == "none" else {}
    if field == "length" and ok == MAX_STORED_CHUNK:
        fix = {"size": MAX_CHUNK_SIZE}
    good = dataclasses.replace(LOC, **{**fix, field: ok})
    target, headers = signed(good)
    assert wire.parse_request("GET", target, headers).locator == good
    with pytest.raises(wire.RequestError) as exc:
        _replace(**{**fix, field: bad})
    assert exc.value.status == status


def test_uncompressed_length_must_equal_size():
    with pytest.raises(wire.RequestError):
        _replace(compression="none")  # length 1000, size 2000
    _replace(compression="none", length=2000)


@pytest.mark.parametrize("edit,status", [
    (lambda t: t.replace("&blob=3", ""), 400),                      # missing field
    (lambda t: t + "&blob=3", 400),                                 # twice
    (lambda t: t + "&extra=1", 400),                                # unknown field
    (lambda t: t + "&cached_only=0", 400),                          # only "=1" is a flag
    (lambda t: t.replace("blob=3", "blob=03"), 400),                # leading zero
    (lambda t: t.replace("blob=3", "blob=+3"), 400),
    (lambda t: t.replace("blob=3", "blob=3x"), 400),
    (lambda t: t.replace("blob=3", "blob="), 400),
    (lambda t: t.replace("blob=3", "blob"), 400),
    (lambda t: t.replace("size=2000", f"size={MAX_CHUNK_SIZE + 1}"), 413),
    (lambda t: t.replace("size=2000", "size=" + "9" * 30), 400),    # not a bounded integer
    (lambda t: t.replace("&blob=3&offset=4096", "&offset=4096&blob=3"), 400),  # order
    (lambda t: t.replace("%3A", "%3a"), 400),                       # lower-case escape
    (lambda t: t.replace("models", "%6Dodels"), 400),               # needless escape
    (lambda t: t.replace("models", "m%FFodels"), 400),              # not UTF-8
    (lambda t: t.replace("s3%3A", "s3:"), 400),                     # unescaped reserved
    (lambda t: t.partition("?")[0], 400),                           # no query
    (lambda t: t.replace(SHA, SHA.upper()), 400),
    (lambda t: t.replace("compression=zstd", "compression=lz4"), 400),
    (lambda t: t + "&" + "x" * wire.MAX_TARGET, 400),               # too long
])
def test_malformed_targets(edit, status):
    target, headers = signed()
    with pytest.raises(wire.RequestError) as exc:
        wire.parse_request("GET", edit(target), headers)
    assert exc.value.status == status


def test_method_and_headers_checked_by_the_parser_too():
    target, headers = signed()
    with pytest.raises(wire.RequestError) as exc:
        wire.parse_request("POST", target, headers)
    assert exc.value.status == 405
    with pytest.raises(wire.RequestError):
        wire.parse_request("GET", target, headers[1:])


_text = st.text(st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters="\x7f"),
                min_size=1, max_size=40)
_locators = st.builds(
    lambda origin, key, blob, offset, size, zstd, digest: wire.Locator(
        origin, key, blob, offset, max(1, size // 2) if zstd else size, size,
        "zstd" if zstd else "none", digest),
    _text, _text, st.integers(0, 2**32 - 1), st.integers(0, 2**62),
    st.integers(1, MAX_CHUNK_SIZE), st.booleans(),
    st.text("0123456789abcdef", min_size=64, max_size=64))


@settings(max_examples=300, deadline=None)
@given(loc=_locators, cached_only=st.booleans())
def test_locator_round_trip(loc, cached_only):
    target, headers = signed(loc, cached_only=cached_only)
    assert target.isascii() and " " not in target
    check(target, headers)
    req = wire.parse_request("GET", target, headers)
    assert req.locator == loc and req.cached_only == cached_only
    assert wire.request_target(req.locator, cached_only=cached_only) == target


@pytest.mark.parametrize("status,error", [
    (401, PeerUnauthorized), (403, PeerMiss), (404, PeerMiss), (503, PeerBusy),
    (400, PeerUnavailable), (413, PeerUnavailable), (500, PeerUnavailable),
    (502, PeerUnavailable), (302, PeerProtocolError), (418, PeerProtocolError)])
def test_error_for(status, error):
    exc = wire.error_for(status, {"retry-after": "7"}, peer="p:1")
    assert type(exc) is error and exc.peer == "p:1"
    if status == 503:
        assert exc.retry_after == 7.0


@pytest.mark.parametrize("value,want", [("3", 3.0), (" 0 ", 0.0), ("99999", 3600.0),
                                        (None, 1.0), ("1.5", 1.0), ("soon", 1.0)])
def test_retry_after(value, want):
    assert wire.retry_after(value) == want
