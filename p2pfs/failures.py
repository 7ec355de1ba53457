"""Chunks that just failed to read, remembered for a short while. Pure: callers pass `now`.

Why: after a read fails with EIO, the kernel re-issues the failed read-ahead as a
synchronous read (an mmap fault retries twice more, then raises SIGBUS). Without this
table each retry waits the whole read deadline again, so `cat` failed after 2x
`read_timeout` and an mmap fault after 3x. A chunk that failed within the last `ttl`
seconds fails again at once, so every reader sees the bound it configured; a success
(from any path) clears the entry, and after `ttl` the next read tries the store again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Failure:
    error: BaseException
    at: float


class RecentFailures:
    def __init__(self, ttl: float, max_entries: int = 65536) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._by_digest: OrderedDict[str, Failure] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def record(self, digest: str, error: BaseException, now: float) -> None:
        if self.ttl <= 0:
            return
        self._by_digest[digest] = Failure(error, now)
        self._by_digest.move_to_end(digest)
        while len(self._by_digest) > self.max_entries:
            self._by_digest.popitem(last=False)

    def check(self, digest: str, now: float) -> Failure | None:
        """The failure of `digest` if it happened less than `ttl` ago, else None."""
        f = self._by_digest.get(digest)
        if f is None:
            return None
        if now - f.at >= self.ttl:
            del self._by_digest[digest]
            return None
        return f

    def clear(self, digest: str) -> None:
        self._by_digest.pop(digest, None)
