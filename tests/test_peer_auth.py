"""The cluster token: signing, checking (window, tampering, rotation) and the token file."""

from __future__ import annotations

import logging
import os

import pytest
from hypothesis import given, strategies as st

from p2pfs.errors import ConfigError
from p2pfs.peer._auth import Unauthorized, Verifier, load_tokens, sign

TOK = b"t" * 16 + b"-current"
OLD = b"o" * 16 + b"-previous"
NOW = 1_800_000_000
REQ = dict(method="GET", path="/v1/chunk/" + "a" * 64,
           locator="s3://b/p|blobs/x|1|0|8|8|none|" + "a" * 64, ts=NOW, node="127.0.0.2:7946")


def check(verifier: Verifier, *, now: float = NOW, **fields) -> None:
    req = {**REQ, **fields}
    mac = req.pop("mac", None)
    if mac is None:
        mac = sign(TOK, **req)
    verifier.check(**req, mac=mac, now=now)


def test_round_trip_and_mac_shape():
    mac = sign(TOK, **REQ)
    assert len(mac) == 64 and mac == mac.lower() and int(mac, 16) >= 0
    assert sign(TOK, **REQ) == mac  # deterministic
    Verifier([TOK]).check(**REQ, mac=mac, now=NOW)


def test_wrong_token_is_refused():
    with pytest.raises(Unauthorized, match="wrong mac"):
        Verifier([OLD]).check(**REQ, mac=sign(TOK, **REQ), now=NOW)


@pytest.mark.parametrize("offset", [-30, 30, -29.5, 29.999])
def test_within_window_edge_accepted(offset):
    check(Verifier([TOK], window=30.0), now=NOW + offset)


@pytest.mark.parametrize("offset", [-30.001, 30.001, 3600, -3600])
def test_stale_or_future_refused(offset):
    with pytest.raises(Unauthorized, match="stale"):
        check(Verifier([TOK], window=30.0), now=NOW + offset)


@pytest.mark.parametrize("field,value", [
    ("method", "PUT"), ("path", "/v1/chunk/" + "b" * 64), ("locator", REQ["locator"] + "x"),
    ("ts", NOW + 1), ("node", "127.0.0.3:7946")])
def test_each_field_is_covered(field, value):
    mac = sign(TOK, **REQ)
    with pytest.raises(Unauthorized, match="wrong mac"):
        Verifier([TOK]).check(**{**REQ, field: value}, mac=mac, now=NOW)


def test_fields_cannot_be_shifted_across_boundaries():
    # The same concatenated text split differently must not sign the same.
    a = sign(TOK, method="GET", path="/a\n1:b", locator="c", ts=NOW, node="n")
    b = sign(TOK, method="GET", path="/a", locator="b\n1:c", ts=NOW, node="n")
    c = sign(TOK, method="GE", path="T/a", locator="c", ts=NOW, node="n")
    d = sign(TOK, method="GET", path="/a", locator="c", ts=NOW, node="n")
    assert len({a, b, c, d}) == 4


@given(st.lists(st.text(max_size=6), min_size=4, max_size=4),
       st.lists(st.text(max_size=6), min_size=4, max_size=4))
def test_distinct_fields_sign_distinctly(x, y):
    def mac(f):
        return sign(TOK, method=f[0], path=f[1], locator=f[2], ts=NOW, node=f[3])
    try:
        mx, my = mac(x), mac(y)
    except ValueError:  # lone surrogates cannot be signed (and never arrive from h11)
        return
    assert (mx == my) == (x == y)


@pytest.mark.parametrize("mac,reason", [
    ("", "missing"), ("zz" * 32, "malformed"), ("A" * 64, "malformed"), ("a" * 63, "malformed"),
    ("a" * 65, "malformed")])
def test_missing_or_malformed_mac(mac, reason):
    with pytest.raises(Unauthorized, match=reason):
        Verifier([TOK]).check(**REQ, mac=mac, now=NOW)


def test_missing_node_and_bad_timestamp():
    v = Verifier([TOK])
    with pytest.raises(Unauthorized, match="node"):
        check(v, node="")
    with pytest.raises(Unauthorized, match="timestamp"):
        v.check(**{**REQ, "ts": str(NOW)}, mac=sign(TOK, **REQ), now=NOW)


def test_rotation_accepts_both_tokens_and_no_third():
    v = Verifier([TOK, OLD])
    for tok in (TOK, OLD):
        v.check(**REQ, mac=sign(tok, **REQ), now=NOW)
    with pytest.raises(Unauthorized):
        v.check(**REQ, mac=sign(b"x" * 32, **REQ), now=NOW)


def test_verifier_needs_tokens():
    with pytest.raises(ValueError):
        Verifier([])


# -- the token file --------------------------------------------------------------------------

def write(tmp_path, content: bytes, mode: int = 0o600):
    p = tmp_path / "token"
    p.write_bytes(content)
    os.chmod(p, mode)
    return p


def test_load_one_and_two_tokens(tmp_path):
    assert load_tokens(write(tmp_path, TOK + b"\n")) == (TOK,)
    assert load_tokens(write(tmp_path, b"  " + TOK + b" \n\n\t" + OLD + b"\r\n\n")) == (TOK, OLD)


@pytest.mark.parametrize("content,match", [
    (b"", "no token"), (b"\n  \n", "no token"), (b"short\n", "at least 16"),
    (TOK + b"\n" + b"x" * 15 + b"\n", "token 2 has 15"),
    (TOK + b"\n" + OLD + b"\n" + TOK + b"\n", "3 tokens")])
def test_bad_token_files(tmp_path, content, match):
    p = write(tmp_path, content)
    with pytest.raises(ConfigError, match=match) as err:
        load_tokens(p)
    assert str(p) in str(err.value)


def test_missing_token_file(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        load_tokens(tmp_path / "nope")


def test_group_readable_token_file_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="p2pfs.peer"):
        load_tokens(write(tmp_path, TOK, 0o600))
        assert not caplog.records
        load_tokens(write(tmp_path, TOK, 0o640))
    assert "readable by group or others" in caplog.text
