"""The peer tier inside a real chunk store (local-directory origin), against in-process
peers at the interface: one that sends garbage, one that stalls, one that serves. Plus the
pure ask plan."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from p2pfs.config import CacheConfig, FetchConfig
from p2pfs.diskcache import DiskCache
from p2pfs.manifest import ChunkRef
from p2pfs.metrics import Metrics
from p2pfs.origin import LocalDirOrigin
from p2pfs.peer._auth import Verifier
from p2pfs.peer._client import PeerClient
from p2pfs.peer._health import HedgeBudget, PeerHealth
from p2pfs.peer._members import Membership
from p2pfs.peer._ring import rank
from p2pfs.peer._server import PeerServer
from p2pfs.peer._tier import PeerStats, PeerTier, ask_plan
from p2pfs.plan import ChunkLoc
from p2pfs.store import ChunkStore

CHUNK = 64 * 1024
TOKEN = b"t" * 32
ORIGIN_URL = "file:///origin"
ME, FAKE = "127.0.0.61", "127.0.0.62"


# -- the ask plan (pure) -------------------------------------------------------------------
MEMBERS = [f"10.0.0.{i}:7946" for i in range(1, 6)]


def digests(n: int) -> list[str]:
    return [hashlib.sha256(b"%d" % i).hexdigest() for i in range(n)]


def test_a_reader_asks_the_owner_then_the_next_but_never_below_itself():
    for d in digests(200):
        ranked = rank(d, MEMBERS)
        for me in MEMBERS:
            plan = ask_plan(d, MEMBERS, self_id=me, replicas=1, serving=False, usable=lambda p: True)
            asked = [p for p, _ in plan]
            assert me not in asked and len(asked) <= 2
            if ranked[0] == me:  # an owner asks rank 2 for what it holds, once
                assert plan == [(ranked[1], True)]
            else:
                assert not any(cached for _, cached in plan)
                assert asked == [p for p in ranked[:ranked.index(me)]][:2]


def test_unusable_peers_are_skipped_and_the_plan_may_be_empty():
    d = digests(1)[0]
    ranked = rank(d, MEMBERS)
    me = ranked[2]
    plan = ask_plan(d, MEMBERS, self_id=me, replicas=1, serving=False,
                    usable=lambda p: p != ranked[0])
    assert plan == [(ranked[1], False)]  # the down owner is skipped; everyone picks rank 2
    assert ask_plan(d, MEMBERS, self_id=me, replicas=1, serving=False, usable=lambda p: False) == []


def test_a_node_asked_as_owner_only_asks_what_others_hold():
    for d in digests(50):
        ranked = rank(d, MEMBERS)
        for me in ranked[:2]:
            plan = ask_plan(d, MEMBERS, self_id=me, replicas=1, serving=True, usable=lambda p: True)
            assert len(plan) == 1 and plan[0][1] is True and plan[0][0] != me
            assert plan[0][0] in ranked[:2]


def test_with_replicas_readers_spread_over_the_owners():
    firsts = set()
    for me in [f"10.1.0.{i}:7946" for i in range(40)]:
        members = [*MEMBERS, me]
        d = digests(1)[0]
        owners = rank(d, members)[:3]
        if me in owners:
            continue
        plan = ask_plan(d, members, self_id=me, replicas=3, serving=False, usable=lambda p: True)
        assert plan[0][0] in owners
        firsts.add(plan[0][0])
    assert len(firsts) >= 2  # not every reader on the same owner


# -- the tier in a store, against in-process peers ----------------------------------------
def blob(tmp_path: Path, n: int = 8) -> tuple[bytes, list[ChunkLoc]]:
    data = os.urandom(n * CHUNK)
    (tmp_path / "origin").mkdir(exist_ok=True)
    (tmp_path / "origin" / "blob").write_bytes(data)
    locs = [ChunkLoc("blob", ChunkRef(0, o, CHUNK, CHUNK, "none",
                                      hashlib.sha256(data[o:o + CHUNK]).hexdigest()))
            for o in range(0, len(data), CHUNK)]
    return data, locs


class Fake:
    """A peer's handler: `mode` "garbage" (wrong bytes), "good", or "stall_once" (the next
    request waits until `release` is set, the others are served at once)."""

    def __init__(self, data: bytes, locs: list[ChunkLoc], mode: str) -> None:
        self.by_digest = {loc.digest: data[loc.ref.offset:loc.ref.offset + CHUNK] for loc in locs}
        self.mode = mode
        self.calls = 0
        self.stall_next = False
        self.release = trio.Event()

    async def __call__(self, req):
        self.calls += 1
        if self.stall_next:
            self.stall_next = False
            await self.release.wait()
        if self.mode == "garbage":
            return b"\0" * req.locator.size, "disk"
        return self.by_digest[req.locator.digest], "disk"


async def setup(nursery, tmp_path: Path, fake: Fake, *, hedge_fraction: float = 0.0):
    server = PeerServer(FAKE, 0, verifier=Verifier([TOKEN]), handler=fake, ready=True)
    _, port = await nursery.start(server.serve)
    me, peer = f"{ME}:{port}", f"{FAKE}:{port}"
    metrics = Metrics()
    health = PeerHealth()
    stats = PeerStats()
    members = Membership(self_id=me, static=[me, peer])
    tier = PeerTier(node_id=me, origin_url=ORIGIN_URL, members=members,
                    client=PeerClient(node_id=me, token=TOKEN), health=health,
                    hedge=HedgeBudget(fraction=hedge_fraction), stats=stats, metrics=metrics,
                    request_timeout=2.0, replicas=1, hedge_quantile=0.9, origin_tier=None,
                    serving=False)
    disk = DiskCache(tmp_path / "cache", 1 << 30)
    disk.scan()
    store = ChunkStore(LocalDirOrigin(tmp_path / "origin"), disk,
                       fetch=FetchConfig(read_timeout=10.0, max_request=4 * CHUNK),
                       cache=CacheConfig(memory_size=64 * CHUNK), metrics=metrics, peers=tier)
    tier.origin_tier = store.origin_tier
    await nursery.start(store.run)
    await nursery.start(tier.run)
    return store, tier, peer


async def test_a_peer_sending_wrong_bytes_is_never_served_and_is_banned(tmp_path):
    data, locs = blob(tmp_path)
    fake = Fake(data, locs, "garbage")
    async with trio.open_nursery() as nursery:
        store, tier, peer = await setup(nursery, tmp_path, fake)
        got = await store.get(locs[:1])
        assert bytes(got[0]) == data[:CHUNK]  # from the origin, checked
        assert tier.health.state(peer, trio.current_time()) == "banned"
        assert tier.stats.bans == 1 and store.metrics.errors["peer_integrity"] == 1
        calls = fake.calls
        got = await store.get(locs[1:])
        assert b"".join(bytes(g) for g in got) == data[CHUNK:]
        assert fake.calls == calls  # a banned peer is not asked again
        assert store.metrics.bytes_by_source.get("peer", 0) == 0
        assert store.disk.stats().chunks <= len(locs)
        nursery.cancel_scope.cancel()
    # Nothing the fake sent reached the disk cache: every chunk there reads back right.
    for loc in locs:
        buf = bytearray(CHUNK)
        if store.disk.read_into(loc.digest, memoryview(buf)):
            assert hashlib.sha256(buf).hexdigest() == loc.digest


async def test_a_good_peer_serves_and_is_counted(tmp_path):
    data, locs = blob(tmp_path)
    fake = Fake(data, locs, "good")
    async with trio.open_nursery() as nursery:
        store, tier, peer = await setup(nursery, tmp_path, fake)
        buf = memoryview(bytearray(len(data)))
        await store.fill(locs, buf)  # the fill path (a client's memory) goes through peers too
        assert bytes(buf) == data
        assert store.metrics.bytes_by_source["peer"] == len(data)
        assert tier.stats.bytes_from[peer] == len(data)
        assert "origin" not in store.metrics.bytes_by_source
        nursery.cancel_scope.cancel()


async def test_a_stalled_peer_request_is_hedged_to_the_origin_within_the_budget(tmp_path):
    data, locs = blob(tmp_path, n=48)
    fake = Fake(data, locs, "good")
    async with trio.open_nursery() as nursery:
        store, tier, peer = await setup(nursery, tmp_path, fake, hedge_fraction=0.05)
        for loc in locs[:40]:  # latency samples and hedge budget (40 x 5% = 2 hedges)
            await store.get([loc])
        # A chunk the fake owns (for one we own we would only ask it cached-only, unhedged).
        i = next(i for i in range(40, 48) if rank(locs[i].digest, [tier.node_id, peer])[0] == peer)
        fake.stall_next = True
        t0 = trio.current_time()
        (got,) = await store.get([locs[i]])
        took = trio.current_time() - t0
        assert bytes(got) == data[i * CHUNK:(i + 1) * CHUNK]
        # Without the hedge the read would wait the 2 s stall timeout, then the origin.
        assert took < 1.9, f"the hedge did not rescue the read ({took:.2f}s)"
        assert tier.stats.hedge_wins >= 1
        assert tier.stats.hedges <= 0.05 * 41  # within the budget (a loaded machine may
                                              # hedge a slow warm-up request too)
        assert tier.health.state(peer, trio.current_time()) == "up"  # a slow peer is no ban
        fake.release.set()
        nursery.cancel_scope.cancel()



async def test_a_chunk_the_protocol_cannot_name_skips_peers_and_still_reads(tmp_path):
    """A blob key beyond the protocol's bound (1024 bytes) cannot be asked for: the read
    goes to the origin instead of failing."""
    data, _ = blob(tmp_path)
    long_key = "d/" * 550 + "k"  # 1101 bytes, in short path components
    (tmp_path / "origin" / long_key).parent.mkdir(parents=True)
    (tmp_path / "origin" / long_key).write_bytes(data)
    loc = ChunkLoc(long_key, ChunkRef(0, 0, CHUNK, CHUNK, "none", hashlib.sha256(data[:CHUNK]).hexdigest()))
    fake = Fake(data, [], "good")
    async with trio.open_nursery() as nursery:
        store, tier, _ = await setup(nursery, tmp_path, fake)
        (got,) = await store.get([loc])
        assert bytes(got) == data[:CHUNK] and fake.calls == 0
        assert tier.stats.requests["not_shareable"] == 1
        nursery.cancel_scope.cancel()
