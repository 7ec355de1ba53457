"""Integration: several real p2pfs daemons on distinct loopback addresses (127.0.0.10+i),
one real SeaweedFS behind a counting relay (tests/peer_helpers.StoreRelay), one model of
random bytes read cold on every node at once.

What is asserted: the bytes every node reads are the published bytes; origin egress
counted at the store's side is ~1x the model with peers on (and ~Nx with peers off, the
baseline that proves the relay counts); a peer killed (SIGKILL) mid-read or stopped
(SIGSTOP) costs no read its correctness, every read ends within READ_BOUND_S and, with
the store not paced, no read(2) waits longer than STALL_BOUND_S; a node that joins while the others read serves and
reads correctly. The peers-on tests skip while `p2pfs mount` lacks --peer-listen.
Needs root and /dev/fuse; skips and says so otherwise."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid

import pytest

from conftest import HAVE_FUSE, needs_fuse, p2pfs_cmd, wait_for
from peer_helpers import (Cluster, Readers, StoreRelay, bytes_by_source, mount_has_peer_flags,
                          read_all_nodes)

MiB = 1 << 20
MODEL_SIZE = 96 * MiB + 12345  # 24 chunks of 4 MiB and a tail
CHUNK = "4MiB"
#: Every node's read_timeout; a read that cannot be served in time fails with EIO.
READ_TIMEOUT = 20.0
#: The longest any single read(2) may wait when the store is not paced: a peer request's
#: deadline (2 s by default) plus an origin fetch and the scheduling noise of 2 busy
#: cores. Well inside READ_TIMEOUT: falling back only at read_timeout (or after several
#: peer deadlines in a row) fails it. (With a paced store every chunk in flight shares
#: the pace, so one read(2) may wait for most of the file: no such bound there.)
STALL_BOUND_S = 6.0
#: Every whole-model read ends within this (a cold read here takes a few seconds).
READ_BOUND_S = 90.0
#: The store's pace (bytes/s) where the store must be the bottleneck, as in the cloud, or
#: a fault must land in the middle of a read: the cold read then takes ~3 s (kill), or
#: ~5 s of BIG_MODEL_SIZE (slow store; a join, which waits for a daemon's start). Not
#: slower: the chunks in flight share the pace, and each must still arrive well within
#: READ_TIMEOUT with peers off.
KILL_RATE = 32 * MiB
SLOW_RATE = 48 * MiB
BIG_MODEL_SIZE = 256 * MiB + 4321

HAVE_PEERS = HAVE_FUSE and mount_has_peer_flags()
needs_peers = pytest.mark.skipif(not HAVE_PEERS, reason="p2pfs mount has no --peer-listen yet "
                                 "(the peer tier is not wired into the daemon)")
pytestmark = [pytest.mark.fuse, pytest.mark.s3, needs_fuse]


def publish_model(seaweed, tmp_path_factory, size: int) -> dict:
    src = tmp_path_factory.mktemp("peers-src") / "m"
    src.mkdir()
    data = os.urandom(size)
    (src / "model.bin").write_bytes(data)
    url = f"s3://models/peers-{uuid.uuid4().hex[:8]}"
    p2pfs_cmd("publish", "--chunk-size", CHUNK, str(src), f"{url}/m", endpoint=seaweed.endpoint)
    return {"url": url, "rel": "m/model.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory) -> dict:
    return publish_model(seaweed, tmp_path_factory, MODEL_SIZE)


@pytest.fixture(scope="module")
def big_model(seaweed, tmp_path_factory) -> dict:
    """Long enough to read that a daemon can start in the middle of it."""
    return publish_model(seaweed, tmp_path_factory, BIG_MODEL_SIZE)


@pytest.fixture
def relay_at(seaweed):
    """relay_at(rate=0): a counting relay in front of the store, paced to rate bytes/s."""
    relays: list[StoreRelay] = []

    def make(rate: float = 0) -> StoreRelay:
        relays.append(StoreRelay(("127.0.0.1", seaweed.s3_port), rate=rate).start())
        return relays[-1]

    yield make
    for r in relays:
        r.stop()


@pytest.fixture
def relay(relay_at) -> StoreRelay:
    return relay_at()


def cluster(model, relay, tmp_path, n: int, *, peers: bool) -> Cluster:
    return Cluster(model["url"], relay.endpoint, tmp_path / "cluster", n, peers=peers,
                   args=["--read-timeout", str(READ_TIMEOUT)])


def assert_read_ok(reads, model, what: str, *, stall_bound: float | None = STALL_BOUND_S) -> None:
    for r in reads:
        assert not r.hung, f"{what}: read of {r.path} still running after {READ_BOUND_S}s"
        assert r.ok, f"{what}: read of {r.path} failed: errno {r.errno} signal {r.signal}"
        assert r.n == model["size"] and r.sha256 == model["sha256"], f"{what}: wrong bytes from {r.path}"
        assert stall_bound is None or r.max_gap <= stall_bound, \
            f"{what}: one read(2) of {r.path} waited {r.max_gap:.1f}s (bound {stall_bound}s)"


def cold_read_everywhere(model, relay, tmp_path, n: int, *, peers: bool,
                         stall_bound: float | None = STALL_BOUND_S) -> tuple[int, dict, list[dict]]:
    """Start n fresh nodes, read the model on all at once, check every byte; the store's
    egress for the reads, our bytes by source summed over the nodes, and each node's peer
    counters (`peer_counters`)."""
    with cluster(model, relay, tmp_path, n, peers=peers) as c:
        c.start()
        relay.reset()
        reads = read_all_nodes([c.path(i, model["rel"]) for i in range(n)], timeout=READ_BOUND_S)
        assert_read_ok(reads, model, f"{n} nodes, peers {'on' if peers else 'off'}",
                       stall_bound=stall_bound)
        statuses = c.statuses()
        return relay.egress, bytes_by_source(statuses), peer_counters(statuses)


def peer_counters(statuses) -> list[dict]:
    """Per node: its peer requests by result, hedges and bans (what says which path sent
    a requester to the origin when egress is over its bound)."""
    keys = ("requests", "hedges", "hedge_wins", "bans")
    return [{k: (s.get("peers") or {}).get(k) for k in keys} for s in statuses]


def test_peers_off_every_node_pulls_its_own_copy(model, relay, tmp_path):
    """The baseline, and proof that the relay counts: without peers, 4 cold nodes pull
    ~4x the model from the store."""
    egress, ours, _ = cold_read_everywhere(model, relay, tmp_path, 4, peers=False)
    assert egress > 2 * model["size"], f"store sent {egress / model['size']:.2f}x the model"
    assert egress <= 4.2 * model["size"], f"store sent {egress / model['size']:.2f}x the model"
    # Our own counters agree with the store's side (within the HTTP heads).
    assert ours.get("origin", 0) <= egress <= ours.get("origin", 0) * 1.05 + MiB


@needs_peers
def test_four_nodes_cold_read_cost_one_origin_copy(model, relay, tmp_path):
    egress, ours, counters = cold_read_everywhere(model, relay, tmp_path, 4, peers=True)
    assert egress <= 1.05 * model["size"], \
        f"store sent {egress / model['size']:.2f}x the model to 4 nodes with peers on; {counters}"
    assert ours.get("peer", 0) >= 2 * model["size"], f"bytes by source: {ours}"
    assert ours.get("origin", 0) <= 1.05 * model["size"], f"bytes by source: {ours}"


@needs_peers
def test_four_nodes_behind_a_slow_store_cost_one_origin_copy(big_model, relay_at, tmp_path):
    """The store is the bottleneck: an owner's origin fetch may then take longer than one
    peer request's deadline, and a requester that gives up on the owner and fetches the
    chunk itself multiplies origin egress (the fallback storm)."""
    model = big_model
    egress, ours, counters = cold_read_everywhere(model, relay_at(SLOW_RATE), tmp_path, 4,
                                                  peers=True, stall_bound=None)
    assert egress <= 1.05 * model["size"], \
        f"store sent {egress / model['size']:.2f}x the model to 4 nodes behind a slow store; " \
        f"peer requests per node: {counters}"


def _mid_read(relay, model, fraction: float = 0.3, timeout: float = 30.0) -> None:
    wait_for(lambda: relay.egress >= fraction * model["size"], timeout, "the read to be under way")


@needs_peers
def test_peer_killed_mid_read(model, relay_at, tmp_path):
    """SIGKILL one node while all four read: the other three still read every byte right,
    with no read(2) stalled past the bound."""
    victim, paced_relay = 1, relay_at(KILL_RATE)
    with cluster(model, paced_relay, tmp_path, 4, peers=True) as c:
        c.start()
        paced_relay.reset()
        others = [i for i in range(4) if i != victim]
        readers = Readers([c.path(i, model["rel"]) for i in [*others, victim]])
        try:
            readers.go()
            _mid_read(paced_relay, model)
            c.signal(victim, signal.SIGKILL)
            t_kill = time.monotonic()
            reads = readers.wait(READ_BOUND_S)[:len(others)]  # the victim's own read may fail
        finally:
            readers.kill()
        assert_read_ok(reads, model, "peer killed", stall_bound=None)
        assert min(r.t1 for r in reads) > t_kill, "a read ended before the kill: not mid-read"
        for i in others:
            assert c.nodes[i].alive(), f"node {i} died"


@needs_peers
def test_peer_stopped_reads_complete_by_fallback(model, relay, tmp_path):
    """SIGSTOP one node (connections are accepted, no byte ever comes) before the others
    read: they fall back (next rank, origin, hedge) within the deadline."""
    victim = 2
    with cluster(model, relay, tmp_path, 4, peers=True) as c:
        c.start()
        relay.reset()
        c.signal(victim, signal.SIGSTOP)
        try:
            others = [i for i in range(4) if i != victim]
            reads = read_all_nodes([c.path(i, model["rel"]) for i in others], timeout=READ_BOUND_S)
        finally:
            c.signal(victim, signal.SIGCONT)
        assert_read_ok(reads, model, "peer stopped")
        # Fallback must not become a storm: at worst each survivor fetched the stopped
        # node's share itself, plus the shares of the others once.
        assert relay.egress <= 2.0 * model["size"], \
            f"store sent {relay.egress / model['size']:.2f}x the model"


@needs_peers
def test_node_joining_while_others_read(big_model, relay_at, tmp_path):
    """Five members from the start, four running; the fifth starts mid-read, then reads
    too. Every read is right; the join costs the store at most a fraction more."""
    model, joiner, paced_relay = big_model, 4, relay_at(SLOW_RATE)
    with cluster(model, paced_relay, tmp_path, 5, peers=True) as c:
        c.start(range(4))
        paced_relay.reset()
        readers = Readers([c.path(i, model["rel"]) for i in range(4)])
        try:
            readers.go()
            _mid_read(paced_relay, model, 0.1)
            c.start([joiner])
            t_joined = time.monotonic()
            late = read_all_nodes([c.path(joiner, model["rel"])], timeout=READ_BOUND_S)
            reads = readers.wait(READ_BOUND_S)
        finally:
            readers.kill()
        assert_read_ok(reads + late, model, "join", stall_bound=None)
        assert min(r.t1 for r in reads) > t_joined, "a read ended before the join: not mid-read"
        assert paced_relay.egress <= 1.5 * model["size"], \
            f"store sent {paced_relay.egress / model['size']:.2f}x the model"
        st = c.status(joiner)
        assert (st.get("bytes_by_source") or {}).get("origin", 0) < model["size"], \
            f"the joiner read everything from the origin: {st.get('bytes_by_source')}"
