"""Membership: address parsing, static lists, DNS (fake resolver and one real getaddrinfo)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import trio

from p2pfs.errors import ConfigError
from p2pfs.peer._members import Membership, format_addr, normalize_addr, parse_addr

SELF = "10.0.0.1:7946"


class FakeDNS:
    """A resolver whose answer a test sets: a list of addresses, or an exception."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def __call__(self, host, port):
        self.calls.append((host, port))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)


@pytest.mark.parametrize("addr,parsed,canonical", [
    ("127.0.0.2:7946", ("127.0.0.2", 7946), "127.0.0.2:7946"),
    (" Node-1.Example.svc:80 ", ("Node-1.Example.svc", 80), "node-1.example.svc:80"),
    ("[::1]:7946", ("::1", 7946), "[::1]:7946"),
    ("[2001:DB8:0:0::1]:1", ("2001:DB8:0:0::1", 1), "[2001:db8::1]:1"),
    ("localhost:65535", ("localhost", 65535), "localhost:65535"),
])
def test_parse_and_normalize(addr, parsed, canonical):
    assert parse_addr(addr) == parsed
    assert normalize_addr(addr) == canonical


@pytest.mark.parametrize("addr", [
    "", "host", "host:", ":7946", "host:0", "host:65536", "host:x1", "host:٣", "::1:7946",
    "[::1]7946", "[::1]", "[10.0.0.1]:80", "[nothost]:80", "a..b:1", "-a:1", "a b:1", "a/b:1"])
def test_parse_rejects(addr):
    with pytest.raises(ConfigError, match="peer address"):
        parse_addr(addr)


def test_format_addr():
    assert format_addr("::ffff:0:1", 5) == "[::ffff:0:1]:5"
    assert format_addr("192.168.1.1", 5) == "192.168.1.1:5"


async def test_static_members_sorted_and_self_excluded_from_peers():
    m = Membership(self_id=SELF, static=["10.0.0.3:7946", "10.0.0.1:7946", "[::1]:7946",
                                         "10.0.0.3:7946"])
    assert m.members() == ("10.0.0.1:7946", "10.0.0.3:7946", "[::1]:7946")
    assert m.peers() == ("10.0.0.3:7946", "[::1]:7946")
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)  # no DNS: returns at once
    assert m.version == 0


async def test_static_without_self():
    m = Membership(self_id=SELF, static=["10.0.0.2:7946"])
    assert m.members() == ("10.0.0.2:7946",) and m.peers() == ("10.0.0.2:7946",)


async def test_dns_records_merge_with_static_and_changes_bump_version():
    dns = FakeDNS(["10.0.0.9", "10.0.0.1", "::1", "10.0.0.9"])
    seen = []
    m = Membership(self_id=SELF, static=["10.0.0.5:7000"], dns="peers.svc:7946", resolve=dns,
                   on_change=seen.append)
    assert await m.refresh_once()
    assert dns.calls == [("peers.svc", 7946)]
    assert m.members() == ("10.0.0.1:7946", "10.0.0.5:7000", "10.0.0.9:7946", "[::1]:7946")
    assert m.peers() == ("10.0.0.5:7000", "10.0.0.9:7946", "[::1]:7946")
    assert m.version == 1 and seen == [m.members()]
    dns.answer = ["::1", "10.0.0.1", "10.0.0.9"]  # same set, another order
    assert await m.refresh_once()
    assert m.version == 1 and len(seen) == 1
    dns.answer = ["10.0.0.1", "10.0.0.10"]  # one left, one joined
    assert await m.refresh_once()
    assert m.members() == ("10.0.0.10:7946", "10.0.0.1:7946", "10.0.0.5:7000")  # str order
    assert m.version == 2 and seen[-1] == m.members()
    dns.answer = ["10.0.0.5"]  # static members stay whatever DNS says
    assert await m.refresh_once()
    assert m.members() == ("10.0.0.5:7000", "10.0.0.5:7946")


async def test_failure_keeps_the_last_list_and_logs_once_per_streak(caplog):
    dns = FakeDNS(["10.0.0.2", "10.0.0.3"])
    m = Membership(self_id=SELF, dns="peers.svc:7946", resolve=dns)
    assert await m.refresh_once()
    good = m.members()
    with caplog.at_level(logging.WARNING, logger="p2pfs.peer"):
        for answer in (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                       OSError("resolver down"), []):
            dns.answer = answer
            assert not await m.refresh_once()
            assert m.members() == good and m.version == 1
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        assert "Name or service not known" in caplog.text
        dns.answer = ["10.0.0.2"]
        assert await m.refresh_once()
        assert m.members() == ("10.0.0.2:7946",)
        dns.answer = OSError("down again")
        assert not await m.refresh_once()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "down again" in warnings[-1].getMessage()


async def test_a_hung_resolver_times_out_and_threads_do_not_pile_up():
    release = threading.Event()
    calls = []

    def hung(host, port):
        calls.append(host)
        release.wait(10)
        return ["10.0.0.2"]

    m = Membership(self_id=SELF, static=["10.0.0.7:7946"], dns="peers.svc:7946", resolve=hung,
                   resolve_timeout=0.2)
    try:
        t0 = time.monotonic()
        assert not await m.refresh_once()
        assert not await m.refresh_once()  # waits for the one thread, not a second one
        assert 0.35 <= time.monotonic() - t0 < 2.0
        assert calls == ["peers.svc"]
        assert m.members() == ("10.0.0.7:7946",)
    finally:
        release.set()


async def test_run_refreshes_periodically():
    dns = FakeDNS(["10.0.0.2"])
    m = Membership(self_id=SELF, dns="peers.svc:7946", resolve=dns, refresh=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        assert m.members() == ("10.0.0.2:7946",)  # resolved before reporting started
        dns.answer = ["10.0.0.2", "10.0.0.3"]
        with trio.fail_after(2):
            while m.version < 2:
                await trio.sleep(0.01)
        assert m.members() == ("10.0.0.2:7946", "10.0.0.3:7946")
        nursery.cancel_scope.cancel()


async def test_real_getaddrinfo_of_localhost():
    m = Membership(self_id="127.0.0.1:7946", dns="localhost:7946")
    assert await m.refresh_once()
    assert set(m.members()) & {"127.0.0.1:7946", "[::1]:7946"}
    assert m.members() == tuple(sorted(set(m.members())))


async def test_an_empty_answer_is_a_failure_named_as_such(caplog):
    m = Membership(self_id=SELF, static=["10.0.0.7:7946"], dns="peers.svc:7946",
                   resolve=FakeDNS([]))
    with caplog.at_level(logging.WARNING, logger="p2pfs.peer"):
        assert not await m.refresh_once()
    assert "no records" in caplog.text and m.members() == ("10.0.0.7:7946",)
