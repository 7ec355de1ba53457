"""A lease in the object store, so that one node converts a layer while the others pull it
normally (convert on first pull).

S3 offers no compare-and-swap that every S3-compatible store implements, so the lease is
write-then-confirm: read the lock object; if a live lease of someone else is there, back
off; else write ours, wait `settle` seconds and read it back: whoever's write is there
then holds it (stores are read-after-write consistent, so the last writer wins on every
node that reads after the settle). Two nodes can both win only if one's write lands
more than `settle` after the other's read-back; the cost is then one layer converted
twice into the same content-addressed packs, never a wrong layer. A holder that dies
leaves a lease that expires after `ttl`; a long conversion renews it.

    ROOT/.p2pfs/locks/<hex>  {"owner": "<node>/<pid>/<random>", "expires": <unix seconds>}
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import trio

from ..errors import ObjectNotFound
from ..origin import Location, Origin

LOCK_PREFIX = ".p2pfs/locks/"


def lock_key(root: Location, hex_: str) -> str:
    return f"{root.prefix}{LOCK_PREFIX}{hex_}"


def new_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    expires: float

    def encode(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": self.expires}).encode()

    @staticmethod
    def parse(data: bytes) -> "Lease | None":
        """None for anything that is not a lease (treated as no lease)."""
        try:
            doc = json.loads(data)
            return Lease(str(doc["owner"]), float(doc["expires"]))
        except (ValueError, KeyError, TypeError, RecursionError):
            return None

    def held_by_other(self, owner: str, now: float) -> bool:
        return self.owner != owner and self.expires > now


async def _read(origin: Origin, key: str) -> Lease | None:
    try:
        return Lease.parse(bytes(await origin.get(key)))
    except ObjectNotFound:
        return None


async def acquire(origin: Origin, root: Location, hex_: str, owner: str, *, ttl: float = 600.0,
                  settle: float = 0.5, clock: Callable[[], float] = time.time) -> bool:
    """Take the conversion lease of layer `hex_`; False if another node holds it."""
    key = lock_key(root, hex_)
    current = await _read(origin, key)
    if current is not None and current.held_by_other(owner, clock()):
        return False
    await origin.put(key, Lease(owner, clock() + ttl).encode())
    await trio.sleep(settle)
    back = await _read(origin, key)
    return back is not None and back.owner == owner


async def renew(origin: Origin, root: Location, hex_: str, owner: str, *, ttl: float = 600.0) -> None:
    await origin.put(lock_key(root, hex_), Lease(owner, time.time() + ttl).encode())


async def release(origin: Origin, root: Location, hex_: str, owner: str) -> None:
    """Give the lease up (an expired lease: the store has no delete in our interface)."""
    await origin.put(lock_key(root, hex_), Lease(owner, 0.0).encode())
