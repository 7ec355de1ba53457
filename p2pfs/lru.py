"""A byte-budgeted LRU index: pure bookkeeping of which keys to evict, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)


class ByteLRU(Generic[K]):
    """Tracks sizes in recency order. `add`/`touch` make a key most recent; `evict` returns the
    least recent keys that must go for the total to fit the budget. Not thread-safe: callers
    that share one hold their own lock.

    Room for an entry that is still being made (a file being written) is held with
    `reserve` and handed over with `commit` (or given back with `release`). Through those,
    `used + reserved <= budget` holds at every step: the room is made before the entry
    exists, so whatever the entry stands for never overshoots the budget, not even briefly.
    `add` alone (rebuilding an index) may overshoot until the next `evict`."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        self.budget = budget
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self.used = 0
        self.reserved = 0

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> Iterable[K]:
        return iter(self._sizes)

    def add(self, key: K, size: int) -> None:
        if key in self._sizes:
            self.used -= self._sizes[key]
        self._sizes[key] = size
        self._sizes.move_to_end(key)
        self.used += size

    def size(self, key: K) -> int | None:
        return self._sizes.get(key)

    def touch(self, key: K) -> bool:
        if key not in self._sizes:
            return False
        self._sizes.move_to_end(key)
        return True

    def remove(self, key: K) -> int:
        size = self._sizes.pop(key, 0)
        self.used -= size
        return size

    def reserve(self, size: int) -> list[K] | None:
        """Hold room for `size` more bytes: evict least-recently-used keys until
        used + reserved + size <= budget, then count `size` as reserved; return the evicted
        keys. None, evicting nothing, if other reservations leave less than `size` of the
        budget (retry once one of them ends)."""
        if size < 0:
            raise ValueError("size must be >= 0")
        if self.reserved + size > self.budget:
            return None
        victims = self.evict(reserve=self.reserved + size)
        self.reserved += size
        return victims

    def commit(self, key: K, size: int) -> None:
        """Turn a reservation of `size` into the entry `key` (most recent)."""
        self.release(size)
        self.add(key, size)

    def release(self, size: int) -> None:
        """Give back a reservation of `size` that will not become an entry."""
        if not 0 <= size <= self.reserved:
            raise ValueError(f"releasing {size} of {self.reserved} reserved bytes")
        self.reserved -= size

    def evict(self, reserve: int = 0, keep: K | None = None, limit: int | None = None) -> list[K]:
        """Drop least-recently-used keys until used + reserve <= limit (default: the budget);
        return them. `keep` (typically the key just added) is never chosen."""
        limit = self.budget if limit is None else limit
        victims: list[K] = []
        while self.used + reserve > limit:
            for key in self._sizes:  # oldest first; O(1) unless `keep` is the oldest
                if key != keep:
                    break
            else:
                break
            victims.append(key)
            self.used -= self._sizes.pop(key)
        return victims
