"""The memory tier: recently read and read-ahead chunks, within a byte budget.

One structure: the byte LRU orders the digests and the dict holds their buffers, both
changed together in `put`/`get`. Buffers are read-only from here on: verified bytes in a
buffer the store owns (never a client's memory, which may change after we answer).
"""

from __future__ import annotations

from ..lru import ByteLRU

Buffer = bytes | bytearray | memoryview


class MemoryTier:
    name = "memory"

    def __init__(self, budget: int) -> None:
        self._lru: ByteLRU[str] = ByteLRU(budget)
        self._data: dict[str, Buffer] = {}

    @property
    def budget(self) -> int:
        return self._lru.budget

    @property
    def used(self) -> int:
        return self._lru.used

    def __contains__(self, digest: object) -> bool:
        return digest in self._data

    def get(self, digest: str) -> Buffer | None:
        data = self._data.get(digest)
        if data is not None:
            self._lru.touch(digest)
        return data

    def put(self, digest: str, data: Buffer) -> None:
        self._data[digest] = data
        self._lru.add(digest, len(data))
        for victim in self._lru.evict(keep=digest):
            self._data.pop(victim, None)
        if self._lru.budget < len(data):  # larger than the whole tier: not kept
            self._lru.remove(digest)
            self._data.pop(digest, None)

    def clear(self) -> None:
        for digest in list(self._data):
            self._lru.remove(digest)
        self._data.clear()
