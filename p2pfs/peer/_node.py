"""One node's peer side, wired from `[peers]`: membership, the client and the two peer
tiers the chunk store asks, and the server that answers other nodes from the store.

    PeerNode.create(cfg, origin_url=..., metrics=...)     # before the store exists
    store = ChunkStore(..., peers=node.reader_tier, owner_peers=node.owner_tier)
    node.attach(store)                                    # the server's handler, hedging
    await nursery.start(node.run)                         # DNS, hedges, the server
    node.set_ready(True) ... node.drain(); await node.wait_drained(timeout)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import PeersConfig
from ..errors import ConfigError
from ..metrics import Metrics
from ..origin import parse_url
from ._auth import Verifier, load_tokens
from ._client import PeerClient
from ._health import HedgeBudget, PeerHealth
from ._members import Membership, normalize_addr, parse_addr
from ._server import PeerServer, PeerServerLimits
from ._tier import PeerStats, PeerTier
from ._wire import ChunkRequest, RequestError

if TYPE_CHECKING:
    from ..store import ChunkStore

log = logging.getLogger("p2pfs.peer")


class PeerNode:
    def __init__(self, cfg: PeersConfig, *, origin_url: str, metrics: Metrics,
                 read_timeout: float) -> None:
        if cfg.listen is None or cfg.token_file is None:
            raise ConfigError("[peers] needs listen and token_file")
        self.cfg = cfg
        self.node_id = normalize_addr(cfg.listen)
        self.origin_url = origin_url
        self._origin = parse_url(origin_url)
        self.metrics = metrics
        tokens = load_tokens(cfg.token_file)
        self.members = Membership(self_id=self.node_id, static=cfg.members, dns=cfg.dns,
                                  refresh=cfg.refresh_interval)
        self.client = PeerClient(node_id=self.node_id, token=tokens[0],
                                 connect_timeout=cfg.connect_timeout)
        self.health = PeerHealth(fail_window=cfg.fail_window, fail_threshold=cfg.fail_threshold,
                                 down_for=cfg.down_for, ban_base=cfg.ban_base, ban_max=cfg.ban_max)
        # A small burst: every node of a cluster hedges on its own budget, so the cluster's
        # extra origin bytes are up to N x fraction of a model; the burst adds N x burst chunks.
        self.hedge = HedgeBudget(fraction=cfg.hedge_fraction, burst=2.0)
        self.stats = PeerStats()
        common = dict(node_id=self.node_id, origin_url=origin_url, members=self.members,
                      client=self.client, health=self.health, hedge=self.hedge,
                      stats=self.stats, metrics=metrics, request_timeout=cfg.request_timeout,
                      replicas=cfg.replicas, hedge_quantile=cfg.hedge_quantile)
        self.reader_tier = PeerTier(**common, origin_tier=None, serving=False)
        self.owner_tier = PeerTier(**common, origin_tier=None, serving=True)
        host, port = parse_addr(self.node_id)
        self.server = PeerServer(host.strip("[]"), port,
                                 verifier=Verifier(tokens, window=cfg.token_window),
                                 handler=self._handle, registry=metrics.registry,
                                 limits=PeerServerLimits(
                                     max_uploads=cfg.max_uploads, upload_queue=cfg.upload_queue,
                                     upload_rate=cfg.upload_rate,
                                     queue_timeout=min(2.0, cfg.request_timeout / 2)))
        self._read_timeout = read_timeout
        self._store: ChunkStore | None = None

    def attach(self, store: "ChunkStore") -> None:
        self._store = store
        self.reader_tier.origin_tier = store.origin_tier  # hedges go to the origin
        self.metrics.families.append(self._families)

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve members, own the hedges' nursery and serve peers until cancelled.
        Reports the bound address; requests are refused (503) until `set_ready(True)`."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.members.run)
                await nursery.start(self.reader_tier.run)
                bound = await nursery.start(self.server.serve)
                log.info("peer %s serving on %s:%d; members %s", self.node_id, *bound,
                         ", ".join(self.members.members()))
                task_status.started(bound)
        finally:
            self.client.close()  # idle keep-alive connections; requests under way have ended

    def set_ready(self, ready: bool) -> None:
        self.server.set_ready(ready)

    def drain(self) -> None:
        """Answer every new peer request with 503 (and /healthz too): the others move on,
        Kubernetes takes us out of the Service, and nothing half-sent is cut off."""
        self.server.drain()

    async def wait_drained(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self.server.wait_drained()

    async def _handle(self, req: ChunkRequest) -> tuple[Any, str]:
        assert self._store is not None
        self._check_served(req.locator.origin, req.locator.key)
        t0 = trio.current_time()
        data, source = await self._store.serve_peer(req.locator.to_loc(),
                                                    cached_only=req.cached_only,
                                                    timeout=self._read_timeout)
        if trio.current_time() - t0 > 1.0:
            log.debug("served %s to %s from %s after %.2fs", req.locator.digest[:12], req.node,
                      source, trio.current_time() - t0)
        self.stats.bytes_to[req.node] += req.locator.size
        self.metrics.peer_served_bytes += req.locator.size
        return data, source

    def _check_served(self, origin: str, key: str) -> None:
        """Fetch only from the store this node mounts (no open proxy): the same scheme and
        bucket, a key under our prefix, no path tricks."""
        try:
            theirs = parse_url(origin)
        except ConfigError:
            raise RequestError(f"origin {origin[:100]!r} is no origin URL", status=400) from None
        ours = self._origin
        if (theirs.scheme, theirs.bucket) != (ours.scheme, ours.bucket) \
                or not key.startswith(ours.prefix) or ".." in key.split("/") or key.startswith("/"):
            raise RequestError(f"{origin}/{key[:200]}: not served by this node (it serves {ours})",
                               status=403)

    # -- what users see -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        health = self.health.snapshot(now)
        server = self.server.stats()
        members = []
        for m in self.members.members():
            h = health.get(m, {})
            members.append({
                "id": m, "self": m == self.node_id,
                "state": "self" if m == self.node_id else self.health.state(m, now),
                "bytes_from": self.stats.bytes_from.get(m, 0),
                "bytes_to": self.stats.bytes_to.get(m, 0),
                "bans": h.get("bans", 0), "last_error": h.get("last_error", ""),
            })
        return {"self": self.node_id, "ready": server.ready, "draining": server.draining,
                "members": members, "requests": dict(self.stats.requests),
                "served": dict(server.requests), "served_bytes": server.bytes_sent,
                "hedges": self.stats.hedges, "hedge_wins": self.stats.hedge_wins,
                "bans": self.stats.bans}

    def _families(self) -> list[Metric]:
        now = trio.current_time()
        req = CounterMetricFamily("p2pfs_peer_requests", "Peer requests this node made, by result",
                                  labels=["result"])
        for result, n in sorted(self.stats.requests.items()):
            req.add_metric([result], n)
        served = CounterMetricFamily("p2pfs_peer_served_requests",
                                     "Peer requests this node answered, by result", labels=["result"])
        for result, n in sorted(self.server.stats().requests.items()):
            served.add_metric([result], n)
        bfrom = CounterMetricFamily("p2pfs_peer_bytes_from", "Chunk bytes received from each peer",
                                    labels=["peer"])
        bto = CounterMetricFamily("p2pfs_peer_bytes_to", "Chunk bytes served to each peer",
                                  labels=["peer"])
        state = GaugeMetricFamily("p2pfs_peer_up", "1 if a member is usable (not down or banned)",
                                  labels=["peer", "state"])
        for m in self.members.peers():
            bfrom.add_metric([m], self.stats.bytes_from.get(m, 0))
            bto.add_metric([m], self.stats.bytes_to.get(m, 0))
            st = self.health.state(m, now)
            state.add_metric([m, st], 1 if st == "up" else 0)
        return [req, served, bfrom, bto, state,
                CounterMetricFamily("p2pfs_peer_hedges", "Peer requests hedged to the origin",
                                    value=self.stats.hedges),
                CounterMetricFamily("p2pfs_peer_hedge_wins", "Hedges the origin won",
                                    value=self.stats.hedge_wins),
                CounterMetricFamily("p2pfs_peer_bans", "Peers banned for bad bytes or answers",
                                    value=self.stats.bans)]
