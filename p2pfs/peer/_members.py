"""Who is in the cluster: a static list of node ids and/or every A/AAAA record of a DNS name.

A node id is the address its peer server listens on, "host:port" ("[v6]:port" for IPv6),
in one canonical spelling (IP literals compressed, names lower-cased) so that every node
ranks chunks over the same strings. DNS (a Kubernetes headless Service) is re-resolved every
`refresh` seconds in a thread with a timeout; a failed resolution keeps the last good
answer (peers that died meanwhile are covered by passive health). Kubernetes is the
membership engine: there is no gossip here.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Callable, Sequence

import trio

from ..errors import ConfigError

log = logging.getLogger("p2pfs.peer")

# A resolver turns (host, port) into IP address strings; it blocks (it runs in a thread).
Resolver = Callable[[str, int], Sequence[str]]

_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9.])?")


def parse_addr(addr: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port); ConfigError if malformed."""
    if not isinstance(addr, str):
        raise ConfigError(f"peer address {addr!r}: not a string")
    text = addr.strip()
    bad_port = ConfigError(f"peer address {addr!r}: needs host:port with a port in 1..65535")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise bad_port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"peer address {addr!r}: [{host}] is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise bad_port
        if ":" in host:
            raise ConfigError(f"peer address {addr!r}: put an IPv6 address in brackets, "
                              "e.g. [::1]:7946")
        if not _NAME_RE.fullmatch(host) or ".." in host:
            raise ConfigError(f"peer address {addr!r}: {host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise bad_port
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    """The canonical node id of (host, port)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host.lower()}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def normalize_addr(addr: str) -> str:
    return format_addr(*parse_addr(addr))


def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """Every address of `host` (A and AAAA), as the system resolver gives them (blocking)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


class Membership:
    """The current member list. `run` (in the owner's nursery) keeps DNS members fresh."""

    def __init__(self, *, self_id: str, static: Sequence[str] = (), dns: str | None = None,
                 refresh: float = 10.0, resolve: Resolver = getaddrinfo_resolver,
                 resolve_timeout: float = 5.0,
                 on_change: Callable[[tuple[str, ...]], None] | None = None) -> None:
        if not refresh > 0 or not resolve_timeout > 0:
            raise ValueError("refresh and resolve_timeout must be > 0")
        self.self_id = normalize_addr(self_id)
        self._static = frozenset(normalize_addr(a) for a in static)
        self._dns = parse_addr(dns) if dns else None
        self._dns_members: frozenset[str] = frozenset()
        self.refresh = refresh
        self.resolve_timeout = resolve_timeout
        self._resolve = resolve
        self.on_change = on_change
        # One resolution at a time: a thread abandoned on timeout holds this until the
        # resolver returns, so a hung resolver never piles up threads.
        self._limiter = trio.CapacityLimiter(1)
        self._failing = False
        self._members = tuple(sorted(self._static))
        self.version = 0

    def members(self) -> tuple[str, ...]:
        return self._members

    def peers(self) -> tuple[str, ...]:
        return tuple(m for m in self._members if m != self.self_id)

    def _set(self, members: frozenset[str]) -> None:
        new = tuple(sorted(members))
        if new == self._members:
            return
        self._members = new
        self.version += 1
        log.info("peer members (version %d): %s", self.version, ", ".join(new) or "none")
        if self.on_change is not None:
            self.on_change(new)

    async def refresh_once(self) -> bool:
        """Resolve the DNS name once; True if it answered (False keeps the last answer)."""
        if self._dns is None:
            return True
        host, port = self._dns
        error = "timed out"
        addrs = None
        with trio.move_on_after(self.resolve_timeout):
            try:
                addrs = await trio.to_thread.run_sync(self._resolve, host, port,
                                                      limiter=self._limiter,
                                                      abandon_on_cancel=True)
            except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
                error = str(exc) or type(exc).__name__
        if addrs is not None and not addrs:
            error = "no records"
        if not addrs:
            if not self._failing:
                log.warning("peer DNS %s: %s; keeping the last %d members", host, error,
                            len(self._members))
            self._failing = True
            return False
        if self._failing:
            log.info("peer DNS %s answers again", host)
        self._failing = False
        self._dns_members = frozenset(format_addr(a, port) for a in addrs)
        self._set(self._static | self._dns_members)
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Resolve once, report started (whether DNS answered or not), then every `refresh`
        seconds. Without a DNS name there is nothing to do and it returns at once."""
        if self._dns is None:
            task_status.started()
            return
        await self.refresh_once()
        task_status.started()
        while True:
            await trio.sleep(self.refresh)
            await self.refresh_once()

