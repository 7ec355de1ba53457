"""Rendezvous (highest random weight) placement of chunk digests on members (pure).

Each member scores each digest with a 64-bit hash of (member, digest); the highest score
owns the chunk. Every node computes the same ranking from the member list alone, whatever
order it learnt the members in. When a member joins, only the chunks it now wins move (to
it), and their previous owner is then rank 2; when one leaves, only its chunks move, each to
its old rank 2. xxh3 is deterministic across processes and machines (unlike `hash()`).
"""

from __future__ import annotations

from typing import Sequence

import xxhash


def _score(member: str, digest: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\0{digest}".encode())


def rank(digest: str, members: Sequence[str]) -> list[str]:
    """All distinct members, best first, for this digest."""
    # Ties (a 2**-64 chance) break on the id, so the order never depends on the input's.
    return sorted(set(members), key=lambda m: (-_score(m, digest), m))


def owners(digest: str, members: Sequence[str], replicas: int) -> list[str]:
    """The `replicas` best members for this digest (fewer if there are fewer members)."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    return rank(digest, members)[:replicas]
