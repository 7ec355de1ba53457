"""What users see of the peer tier, on real daemons (loopback aliases) and one real
SeaweedFS: `p2pfs status` and /metrics on the peer port, and SIGTERM draining a node
while another reads. Needs root and /dev/fuse; skips and says so otherwise."""

from __future__ import annotations

import hashlib
import os
import signal
import time
import urllib.request
import uuid

import pytest

from conftest import needs_fuse, p2pfs_cmd, wait_for
from peer_helpers import Cluster, StoreRelay, read_all_nodes

MiB = 1 << 20
pytestmark = [pytest.mark.fuse, pytest.mark.s3, needs_fuse]


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory) -> dict:
    src = tmp_path_factory.mktemp("peers-status") / "m"
    src.mkdir()
    data = os.urandom(24 * MiB + 777)
    (src / "model.bin").write_bytes(data)
    url = f"s3://models/peers-status-{uuid.uuid4().hex[:8]}"
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), f"{url}/m", endpoint=seaweed.endpoint)
    return {"url": url, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _metrics(addr: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


def test_status_and_metrics_show_members_and_bytes_by_source(model, seaweed, tmp_path):
    with StoreRelay(("127.0.0.1", seaweed.s3_port)) as relay, \
            Cluster(model["url"], relay.endpoint, tmp_path / "c", 2, peers=True) as c:
        c.start()
        reads = read_all_nodes([c.path(i, "m/model.bin") for i in range(2)], timeout=60)
        assert all(r.ok and r.sha256 == model["sha256"] for r in reads)
        statuses = c.statuses()
        for i, st in enumerate(statuses):
            peers = st["peers"]
            assert peers["self"] == c.addrs[i] and peers["ready"] and not peers["draining"]
            other = next(m for m in peers["members"] if not m["self"])
            assert other["id"] == c.addrs[1 - i] and other["state"] == "up"
        # What one node got from the other, the other says it gave.
        for i in range(2):
            me = statuses[i]["peers"]
            them = statuses[1 - i]["peers"]
            got = next(m for m in me["members"] if not m["self"])["bytes_from"]
            gave = next(m for m in them["members"] if not m["self"])["bytes_to"]
            assert got == gave
        total_peer = sum(s["bytes_by_source"].get("peer", 0) for s in statuses)
        total_origin = sum(s["bytes_by_source"].get("origin", 0) for s in statuses)
        assert total_peer > 0 and total_origin <= 1.05 * model["size"]
        text = _metrics(c.addrs[0])
        assert 'p2pfs_bytes_total{source="peer"}' in text
        assert "p2pfs_peer_requests_total" in text and "p2pfs_peer_bytes_from_total" in text
        assert f'p2pfs_peer_up{{peer="{c.addrs[1]}",state="up"}} 1.0' in text
        human = p2pfs_cmd("status", str(c.nodes[0].path), endpoint=relay.endpoint).stdout
        assert c.addrs[1] in human


def test_sigterm_drains_and_the_others_read_on(model, seaweed, tmp_path):
    """SIGTERM a node: it answers peers 503 (the others move on) and unmounts; a read on
    the other node that starts then completes correctly."""
    with StoreRelay(("127.0.0.1", seaweed.s3_port)) as relay, \
            Cluster(model["url"], relay.endpoint, tmp_path / "c", 2, peers=True) as c:
        c.start()
        c.signal(1, signal.SIGTERM)
        wait_for(lambda: not c.nodes[1].alive(), 20.0, "the drained node to exit")
        t0 = time.monotonic()
        (r,) = read_all_nodes([c.path(0, "m/model.bin")], timeout=60)
        assert r.ok and r.sha256 == model["sha256"]
        assert time.monotonic() - t0 < 30
        st = c.status(0)
        assert st["bytes_by_source"].get("origin", 0) >= model["size"] * 0.99
        gone = next(m for m in st["peers"]["members"] if not m["self"])
        assert gone["last_error"]  # it was asked, refused, and the read went on


def test_a_real_daemon_answers_401_and_nothing_else_without_a_valid_token(model, seaweed, tmp_path):
    """No token, a stale timestamp or another cluster's token: 401 with an empty body;
    the right token gets the chunk (so the refusals are the token's doing)."""
    import http.client

    from p2pfs.peer import _wire as wire

    with Cluster(model["url"], seaweed.endpoint, tmp_path / "c", 1, peers=True) as c:
        c.start()
        token = c.token_file.read_text().split()[0].encode()
        loc = wire.Locator(model["url"], "x/blob", 0, 0, 1, 1, "none", "0" * 64)
        target = wire.request_target(loc, cached_only=True)
        host, _, port = c.addrs[0].rpartition(":")

        def ask(headers: list[tuple[str, str]]) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                conn.request("GET", target, headers=dict(headers))
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        node = "127.0.0.99:1"
        now = int(time.time())
        assert ask([]) == (401, b"")
        assert ask(wire.auth_headers(token, method="GET", target=target, locator=loc, node=node,
                                     ts=now - 3600)) == (401, b"")
        assert ask(wire.auth_headers(b"another-cluster-token!", method="GET", target=target,
                                     locator=loc, node=node, ts=now)) == (401, b"")
        status, _ = ask(wire.auth_headers(token, method="GET", target=target, locator=loc,
                                          node=node, ts=now))
        assert status in (403, 404)  # authenticated: then refused on its merits
