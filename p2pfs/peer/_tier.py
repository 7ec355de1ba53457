"""The peer tier: chunks from the node that owns them, behind the store's Tier interface.

Who is asked (`ask_plan`, pure): the chunk's ranking over the live members (rendezvous
hashing). A reader asks the first usable member of that ranking, and the next one if that
fails, but never anyone ranked below itself: a node that is the best usable candidate
fetches from the origin itself, so every node falling back from a dead owner falls back
to the same node, and the origin still sees one request. An owner (or a node asked as one)
asks at most one other member of the top two, and only for what it already holds
(`cached_only`): after a membership change that is the old owner, which has the chunk.

Bounds: every request has a connect timeout and a deadline (`request_timeout`, inside the
read deadline); a dead, slow or refusing peer costs at most two such deadlines, then the
origin. A slow request may be hedged to the origin after three times the `hedge_quantile`
of recent peer latencies, within a budget (`hedge_fraction` of peer requests), so hedges can never
double origin egress. The hedge lands in its own buffer; if it wins, the peer's socket is
shut and its thread awaited before the bytes go to the destination: one writer at a time.
Bytes are checked against the chunk's digest before anyone sees them; a peer whose bytes or
answers are wrong is banned, one that is slow or refuses only loses health.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import trio
import xxhash

from .._buffers import aligned_empty
from ..errors import (IntegrityError, PeerBusy, PeerError, PeerMiss, PeerProtocolError,
                      PeerUnauthorized)
from ..metrics import Metrics
from ..store import OriginTier, Slot, check_plain
from ._client import Abort, PeerClient
from ._health import HedgeBudget, PeerHealth
from ._members import Membership
from ._ring import rank
from ._wire import Locator, RequestError

log = logging.getLogger("p2pfs.peer")

#: Hedge no peer request before this many seconds, whatever the latencies say.
HEDGE_FLOOR = 0.02
#: A request is hedged once it takes this many times the `hedge_quantile` of recent peer
#: latencies: the normal tail (by definition a tenth of requests exceed the p90) is no
#: reason to ask the origin again; a peer that has become several times slower is. Measured
#: with the quantile itself as the delay, 4 and 8 nodes cold-loading at once hedged 7 and 10
#: chunks (+5% and +8% origin bytes) with every peer healthy.
HEDGE_FACTOR = 3.0
#: Seconds a cached-only ask (rank 2, before the origin) may take: it is answered from
#: memory or disk, so a longer wait means a peer that is stopped or overloaded.
CACHED_ONLY_TIMEOUT = 1.0
#: Latency samples needed before hedging on them.
HEDGE_MIN_SAMPLES = 20


def ask_plan(digest: str, members: Sequence[str], *, self_id: str, replicas: int,
             serving: bool, usable: Callable[[str], bool]) -> list[tuple[str, bool]]:
    """Whom to ask for a chunk, in order, and whether only for a copy they hold."""
    ranked = rank(digest, members)
    if serving or self_id in ranked[:replicas]:
        for peer in ranked[:replicas + 1]:
            if peer != self_id and usable(peer):
                return [(peer, True)]
        return []
    owners = ranked[:replicas]
    # With replicas > 1, readers spread over the owners (each reader its own order).
    k = xxhash.xxh3_64_intdigest(f"{self_id}\0{digest}".encode()) % len(owners) if owners else 0
    order = owners[k:] + owners[:k] + ranked[replicas:]
    asks: list[str] = []
    for peer in order:
        if peer == self_id:
            break  # we are the best candidate left: the origin, through us
        if usable(peer):
            asks.append(peer)
        if len(asks) == 2:
            break
    return [(p, False) for p in asks]


@dataclass
class PeerStats:
    """What this node got from and gave to each peer; shared by both tier instances and
    the server's handler. Updated on the trio thread."""

    requests: Counter = field(default_factory=Counter)   # by result
    bytes_from: Counter = field(default_factory=Counter)  # by peer
    bytes_to: Counter = field(default_factory=Counter)    # by peer (the requester's id)
    hedges: int = 0
    hedge_wins: int = 0
    bans: int = 0


class PeerTier:
    name = "peer"
    per_chunk = True  # chunks have different owners: none waits for another's

    def __init__(self, *, node_id: str, origin_url: str, members: Membership, client: PeerClient,
                 health: PeerHealth, hedge: HedgeBudget, stats: PeerStats, metrics: Metrics,
                 request_timeout: float, replicas: int, hedge_quantile: float,
                 origin_tier: OriginTier | None, serving: bool) -> None:
        self.node_id = node_id
        self.origin_url = origin_url
        self.members = members
        self.client = client
        self.health = health
        self.hedge = hedge
        self.stats = stats
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.replicas = replicas
        self.hedge_quantile = hedge_quantile
        self.origin_tier = origin_tier  # None: never hedge (the owner side)
        self.serving = serving
        self._nursery: trio.Nursery | None = None
        self._warned: dict[str, float] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery hedges run in (a hedge that lost finishes there, unawaited)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def read_into(self, slots: Sequence[Slot], deadline: float) -> list[bool]:
        out = [False] * len(slots)
        members = self.members.members()
        if len(members) < 2:
            return out

        async def one(i: int, slot: Slot) -> None:
            now = trio.current_time()
            for peer, cached_only in ask_plan(slot.loc.digest, members, self_id=self.node_id,
                                              replicas=self.replicas, serving=self.serving,
                                              usable=lambda p: self.health.usable(p, now)):
                left = deadline - trio.current_time()
                if left <= 0:
                    return
                if await self._ask(peer, slot, cached_only, left, deadline):
                    out[i] = True
                    return

        for i, slot in enumerate(slots):  # one at a time: per_chunk, the store sends one
            await one(i, slot)
        return out

    async def _ask(self, peer: str, slot: Slot, cached_only: bool, left: float,
                   deadline: float) -> bool:
        """One request to `peer`; True once verified bytes are in `slot.dest`. It may go
        `request_timeout` without progress, and in all two thirds of what is left of the
        read deadline (an owner behind a slow origin keeps sending 102s), so the origin
        always has the last third."""
        timeout = min(left, self.request_timeout)
        if cached_only:  # "do you hold it": memory or disk at once, or a 404
            timeout = total = min(timeout, CACHED_ONLY_TIMEOUT)
        else:
            total = max(timeout, left * 2 / 3)
        try:
            locator = Locator.from_loc(self.origin_url, slot.loc)
        except RequestError:  # a key or origin beyond the protocol's bounds: origin only
            self.stats.requests["not_shareable"] += 1
            return False
        self.hedge.on_request()
        t0 = trio.current_time()
        hedged: Slot | None = None
        try:
            if cached_only or self.origin_tier is None or self._nursery is None:
                await self.client.fetch_into(peer, locator, slot.dest, timeout=timeout,
                                             cached_only=cached_only, total=total)
            else:
                hedged = await self._race(peer, locator, slot, timeout, total, deadline)
        except PeerError as exc:
            log.debug("peer %s: %s after %.2fs (%s)", peer, type(exc).__name__,
                      trio.current_time() - t0, exc)
            self._count_failure(peer, exc)
            return False
        if hedged is not None:  # the origin won: its verified bytes go in now, alone
            await trio.to_thread.run_sync(lambda: slot.dest.__setitem__(slice(None), hedged.dest))
            slot.xxh = hedged.xxh
            self.stats.hedge_wins += 1
            self.stats.requests["hedge_won"] += 1
            return True
        try:
            slot.xxh = await trio.to_thread.run_sync(_check_and_hash, slot, f"peer:{peer}")
        except IntegrityError as exc:
            self._ban(peer, f"sent bytes that fail their digest ({exc})")
            self.metrics.errors["peer_integrity"] += 1
            self.stats.requests["bad_bytes"] += 1
            return False
        latency = trio.current_time() - t0
        self.health.success(peer, trio.current_time(), latency)
        self.stats.requests["ok"] += 1
        self.stats.bytes_from[peer] += slot.loc.ref.size
        self.metrics.bytes_by_source["peer"] += slot.loc.ref.size
        return True

    async def _race(self, peer: str, locator: Locator, slot: Slot, timeout: float,
                    total: float, deadline: float) -> Slot | None:
        """Ask `peer`, hedging to the origin if it is slow. None: the peer's bytes are in
        `slot.dest` (unchecked); a Slot: the origin's verified bytes, in that slot's own
        buffer (the peer's request has ended, nothing writes into `slot.dest`)."""
        abort = Abort()
        won: list[Slot] = []
        peer_done = trio.Event()
        hedge_done = trio.Event()
        delay = self._hedge_delay(total)

        async def hedge() -> None:
            try:
                with trio.move_on_after(delay):
                    await peer_done.wait()
                if peer_done.is_set() or not self.hedge.try_spend():
                    return
                self.stats.hedges += 1
                staging = Slot(slot.loc, aligned_empty(slot.loc.ref.size), 0, slot.flight, owned=True)
                (outcome,) = await self.origin_tier.read_into([staging], deadline)  # type: ignore[union-attr]
                if outcome is True and not peer_done.is_set():
                    won.append(staging)
                    abort.abort()
            finally:
                hedge_done.set()

        assert self._nursery is not None
        if delay is not None:
            self._nursery.start_soon(hedge)
        else:
            hedge_done.set()
        try:
            await self.client.fetch_into(peer, locator, slot.dest, timeout=timeout, abort=abort,
                                         total=total)
        except PeerError:
            if won:
                return won[0]
            peer_done.set()
            if not hedge_done.is_set():  # the hedge is our origin fetch now: wait for it
                await hedge_done.wait()
                if won:
                    return won[0]
            raise
        peer_done.set()
        return won[0] if won else None

    def _hedge_delay(self, timeout: float) -> float | None:
        if self.health.samples < HEDGE_MIN_SAMPLES:
            return None
        q = self.health.latency_quantile(self.hedge_quantile)
        if q is None or HEDGE_FACTOR * q >= timeout:
            return None
        return max(HEDGE_FLOOR, HEDGE_FACTOR * q)

    def _count_failure(self, peer: str, exc: PeerError) -> None:
        now = trio.current_time()
        if isinstance(exc, PeerMiss):
            self.stats.requests["miss"] += 1
            return
        if isinstance(exc, PeerProtocolError):
            self.stats.requests["protocol_error"] += 1
            self._ban(peer, str(exc))
            return
        kind = "busy" if isinstance(exc, PeerBusy) else \
            "unauthorized" if isinstance(exc, PeerUnauthorized) else "unavailable"
        self.stats.requests[kind] += 1
        self.health.failure(peer, now, f"{kind}: {exc}")
        if isinstance(exc, PeerUnauthorized) and now - self._warned.get(peer, -60.0) >= 60.0:
            self._warned[peer] = now
            log.error("peer %s refused our cluster token (401): the nodes' token files differ; "
                      "give every node the same --cluster-token-file (two lines while rotating)", peer)

    def _ban(self, peer: str, why: str) -> None:
        until = self.health.ban(peer, trio.current_time(), why)
        self.stats.bans += 1
        log.warning("banned peer %s for %.0fs: %s", peer, until, why)


def _check_and_hash(slot: Slot, source: str) -> str:
    check_plain(slot.loc, slot.dest, source)
    return xxhash.xxh3_64_hexdigest(slot.dest)
