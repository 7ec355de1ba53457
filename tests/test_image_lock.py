"""The conversion lease in the object store (write, settle, read back), over the local
directory origin, which has the same contract as S3 (tests/test_origin.py)."""

from __future__ import annotations

import trio

from p2pfs.image._lock import Lease, acquire, lock_key, release
from p2pfs.origin import LocalDirOrigin, parse_url


def _root(tmp_path):
    return LocalDirOrigin(tmp_path), parse_url(f"file://{tmp_path}//layers")


async def test_one_of_many_concurrent_takers_wins(tmp_path):
    origin, root = _root(tmp_path)
    won: list[str] = []

    async def take(owner: str, delay: float) -> None:
        await trio.sleep(delay)
        if await acquire(origin, root, "ab" * 32, owner, settle=0.2):
            won.append(owner)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(take, f"node{i}", i * 0.01)
    assert len(won) == 1


async def test_a_live_lease_keeps_others_out_until_released_or_expired(tmp_path):
    origin, root = _root(tmp_path)
    hex_ = "cd" * 32
    assert await acquire(origin, root, hex_, "a", ttl=100, settle=0, clock=lambda: 1000.0)
    assert not await acquire(origin, root, hex_, "b", settle=0, clock=lambda: 1050.0)
    assert await acquire(origin, root, hex_, "b", settle=0, clock=lambda: 1101.0)  # a's expired
    await release(origin, root, hex_, "b")
    assert await acquire(origin, root, hex_, "c", settle=0, clock=lambda: 1102.0)


async def test_garbage_in_the_lock_object_is_no_lease(tmp_path):
    origin, root = _root(tmp_path)
    hex_ = "ef" * 32
    await origin.put(lock_key(root, hex_), b"\xff not json")
    assert Lease.parse(b"\xff not json") is None and Lease.parse(b'{"owner": 1}') is None
    assert await acquire(origin, root, hex_, "a", settle=0)
