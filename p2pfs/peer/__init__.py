"""The peer tier: nodes of one cluster serve each other chunks by digest.

Modules (each private; import what you need from them until a public API settles):

    _auth      cluster-token HMAC signing and checking (pure)
    _ring      rendezvous (HRW) placement of chunk digests on members (pure)
    _health    per-peer passive health, bans and the hedge budget (pure, `now` passed in)
    _members   the member list: static addresses and periodic DNS resolution


The node's wiring (`PeerNode`, `_node.py`) and the store tier (`PeerTier`, `_tier.py`) are
what the daemon uses.
"""

from ._node import PeerNode

__all__ = ["PeerNode"]
