"""The control protocol's pure core (p2pfs.control._wire): framing, request validation,
descriptor rules and who may connect. No sockets, no mount."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from p2pfs.control import _wire
from p2pfs.control._fds import ancillary_space
from p2pfs.errors import ProtocolError

lines_st = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8)


def drain(buf: _wire.LineBuffer) -> list[bytes]:
    out = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


@given(lines_st, st.data())
def test_lines_come_out_whole_however_the_bytes_are_split(lines, data):
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buf = _wire.LineBuffer(max_line=64)
    got: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        if b > a:
            buf.feed(stream[a:b])
        got.extend(drain(buf))
    buf.feed(b"")
    got.extend(drain(buf))
    assert got == lines


def test_a_last_line_without_newline_counts_at_eof_and_nothing_after():
    buf = _wire.LineBuffer()
    buf.feed(b'{"op": "status"}')
    assert buf.next_line() is None  # maybe more is coming
    buf.feed(b"")
    assert buf.next_line() == b'{"op": "status"}'
    assert buf.next_line() is None


@pytest.mark.parametrize("size", [64, 65, 200])
def test_a_line_longer_than_the_limit_is_refused_before_it_ends(size):
    buf = _wire.LineBuffer(max_line=64)
    buf.feed(b"x" * size)
    if size <= 64:
        assert buf.next_line() is None
        buf.feed(b"\n")
        assert buf.next_line() == b"x" * size
    else:
        with pytest.raises(ProtocolError, match="longer than 64"):
            buf.next_line()


@pytest.mark.parametrize("line", [
    b"", b"\xff\xfe", b"[1]", b"null", b'"op"', b"{", b"[" * 50000, b"1" * 5000,
    b'{"a": ' + b"9" * 5000 + b"}",
])
def test_what_is_not_one_json_object_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        _wire.parse_request(line)


@pytest.mark.parametrize("op", [None, 5, "", "STATUS", "x" * 100, ["status"]])
def test_unknown_ops(op):
    with pytest.raises(ProtocolError, match="unknown op"):
        _wire.op_of({"op": op})


def test_descriptors_only_where_an_op_takes_them():
    _wire.check_fds("status", 0, False)
    _wire.check_fds("fill", 1, False)
    for op, n, dropped in (("status", 1, False), ("status", 0, True), ("prefetch", 1, False),
                           ("fill", 0, False), ("fill", 1, True), ("fill", 2, False)):
        with pytest.raises(ProtocolError, match="file descriptor"):
            _wire.check_fds(op, n, dropped)
    assert max(_wire.OP_FDS.values()) == _wire.MAX_FDS_PER_MESSAGE


def test_room_for_exactly_the_descriptors_we_take():
    # CMSG_SPACE(4) would leave room for two descriptors on 64-bit Linux.
    import socket
    assert ancillary_space(0) == 0
    assert ancillary_space(1) == socket.CMSG_LEN(4) < socket.CMSG_LEN(8)


@given(st.integers(-5, 40), st.integers(-5, 40), st.integers(-5, 40))
def test_fill_requests_stay_within_the_file_and_the_memory(offset, length, at):
    file_size, memory = 30, 20
    r = {"id": "x", "offset": offset, "length": length, "at": at}
    ok = min(offset, length, at) >= 0 and offset + length <= file_size and at + length <= memory
    if ok:
        assert _wire.parse_fill(r, file_size, memory) == ("x", offset, length, at)
    else:
        with pytest.raises(ProtocolError):
            _wire.parse_fill(r, file_size, memory)


@pytest.mark.parametrize("r", [
    {"offset": 0, "length": 1, "at": 0},               # no id
    {"id": 1, "offset": "0", "length": 1, "at": 0},    # a string
    {"id": 1, "offset": 0.5, "length": 1, "at": 0},    # a float
    {"id": 1, "offset": True, "length": 1, "at": 0},   # a bool is not an integer here
    {"id": 1, "offset": 0, "length": None, "at": 0},
])
def test_malformed_fill_requests(r):
    with pytest.raises(ProtocolError):
        _wire.parse_fill(r, 100, 100)


def test_prefetch_arguments():
    assert _wire.parse_prefetch({"path": "/a/b/"}) == ("a/b", 0, None)
    assert _wire.parse_prefetch({"path": "a", "offset": 5, "length": 7}) == ("a", 5, 7)
    for bad in ({"path": 1}, {"offset": -1}, {"offset": "1"}, {"length": 2.5}):
        with pytest.raises(ProtocolError):
            _wire.parse_prefetch(bad)


@pytest.mark.parametrize("peer, group, ok", [
    (_wire.Peer(1, 0, 0), None, True),                       # root
    (_wire.Peer(1, 1000, 1000), None, True),                 # the daemon's own user
    (_wire.Peer(1, 1001, 1001), None, False),
    (_wire.Peer(1, 1001, 1001), 4242, False),
    (_wire.Peer(1, 1001, 4242), 4242, True),                 # primary group
    (_wire.Peer(1, 1001, 1001, (7, 4242)), 4242, True),      # supplementary group
    (_wire.Peer(1, 1001, 1001, (7, 4242)), None, False),     # groups count only if configured
])
def test_who_may_connect(peer, group, ok):
    assert _wire.may_connect(peer, daemon_uid=1000, group=group) is ok


def test_refusals_are_one_json_line_with_a_code():
    line = _wire.encode(_wire.denied(_wire.Peer(9, 1001, 1001), "models"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    msg = json.loads(line)
    assert msg == {"ok": False, "code": "permission_denied",
                   "error": "permission denied: uid 1001 (pid 9) is not root, the daemon's "
                            "user or group models"}


def test_limits_are_checked():
    with pytest.raises(ValueError):
        _wire.ControlLimits(max_connections=0)
    with pytest.raises(ValueError):
        _wire.ControlLimits(idle_timeout=0)


@pytest.mark.parametrize("peer, mode, ok", [
    (_wire.Peer(1, 0, 0), 0o000, True),            # root reads everything
    (_wire.Peer(1, 1000, 100), 0o400, True),       # the owner, owner bits
    (_wire.Peer(1, 1000, 100), 0o044, False),      # the owner class decides, not group/other
    (_wire.Peer(1, 2000, 100), 0o040, True),       # primary group
    (_wire.Peer(1, 2000, 5, (100,)), 0o040, True),  # supplementary group
    (_wire.Peer(1, 2000, 100), 0o404, False),      # the group class decides, not other
    (_wire.Peer(1, 2000, 5), 0o004, True),         # other
    (_wire.Peer(1, 2000, 5), 0o640, False),
])
def test_open_checks_what_the_mount_would(peer, mode, ok):
    assert _wire.may_read(peer, uid=1000, gid=100, mode=mode) is ok


def test_open_takes_no_descriptors():
    _wire.check_fds("open", 0, False)
    with pytest.raises(ProtocolError):
        _wire.check_fds("open", 1, False)
