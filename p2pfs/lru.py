"""A byte-budgeted LRU index: pure bookkeeping of which keys to evict, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)


class ByteLRU(Generic[K]):
    """Tracks sizes in recency order. `add`/`touch` make a key most recent; `evict` returns the
    least recent keys that must go for the total to fit the budget. Not thread-safe: callers
    that share one hold their own lock.

    `reserved` counts bytes that are held but are no entry: room for an entry still being
    made (a file being written: `reserve`, then `commit` or `release`) or an entry dropped
    whose bytes are not gone yet (a file being deleted: `evict(hold=True)` or
    `remove(hold=True)`, then `release` once it is gone). Through those, `used + reserved
    <= budget` holds at every step, so what entries and held bytes stand for never exceeds
    the budget, not even between two steps of the caller's I/O. `add` alone (rebuilding an
    index) may overshoot until the next `evict`."""

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

    def remove(self, key: K, hold: bool = False) -> int:
        """Drop `key`; return its size. `hold`: keep its bytes reserved (release them once
        what they stand for is gone)."""
        size = self._sizes.pop(key, 0)
        self.used -= size
        if hold:
            self.reserved += size
        return size

    def reserve(self, size: int) -> bool:
        """Hold room for `size` more bytes if the budget has it beside used + reserved;
        otherwise hold nothing (make room with `evict(reserve=reserved + size)` first)."""
        if size < 0:
            raise ValueError("size must be >= 0")
        if self.used + self.reserved + size > self.budget:
            return False
        self.reserved += size
        return True

    def commit(self, key: K, size: int) -> None:
        """Turn a reservation of `size` into the entry `key` (most recent)."""
        self.release(size)
        self.add(key, size)

    def release(self, size: int) -> None:
        """Give back a reservation of `size` that will not become an entry."""
        if not 0 <= size <= self.reserved:
            raise ValueError(f"releasing {size} of {self.reserved} reserved bytes")
        self.reserved -= size

    def evict(self, reserve: int = 0, keep: K | None = None, limit: int | None = None,
              hold: bool = False) -> list[K]:
        """Drop least-recently-used keys until used + reserve <= limit (default: the budget);
        return them. `keep` (typically the key just added) is never chosen. `hold`: keep the
        victims' bytes reserved, as `remove(hold=True)` does."""
        limit = self.budget if limit is None else limit
        victims: list[K] = []
        while self.used + reserve > limit:
            for key in self._sizes:  # oldest first; O(1) unless `keep` is the oldest
                if key != keep:
                    break
            else:
                break
            victims.append(key)
            self.remove(key, hold)
        return victims
