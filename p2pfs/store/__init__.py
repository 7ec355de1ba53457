"""The chunk store and its tiers: one path from a read to verified bytes in a buffer.

    _store.py     ChunkStore: get, prefetch, fill, warm, serve_peer; the one load path
    _flights.py   FlightTable: the pure single-flight core
    _tiers.py     Slot, the Tier interface, DiskTier, OriginTier
    _memory.py    MemoryTier: recently read chunks within a byte budget
    _verify.py    decompression and sha256 checks (pure, CPU-bound)

The peer tier (p2pfs.peer) plugs in behind the same Tier interface.
"""

from ._flights import Flight, FlightTable
from ._store import ChunkStore, first_failure
from ._tiers import DiskTier, OriginTier, Slot, Tier
from ._verify import check_plain, place_verified

__all__ = ["ChunkStore", "DiskTier", "Flight", "FlightTable", "OriginTier", "Slot", "Tier",
           "check_plain", "first_failure", "place_verified"]
