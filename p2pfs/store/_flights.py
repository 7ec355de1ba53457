"""The single-flight table: at most one fetch of a chunk at a time, however many readers.

Pure bookkeeping, no I/O and no awaits: a reader claims the digests it misses and learns
which flights it now owns (it must end them) and which it joined (it waits on them). The
only trio object is each flight's Event, which needs no running loop to create or set, so
the table is tested without one.

Invariants (docs/ARCHITECTURE.md, "One chunk path"):
- A digest has at most one flight in the table; `claim` checks and inserts in one call, so
  no await can fall between the two.
- A flight ends exactly once, with data or an error; ending it again is a no-op (so every
  cleanup path may end what it owns without knowing whether it already did).
- An ended flight leaves the table at once: the next claim starts a fresh one.
"""

from __future__ import annotations

from typing import Iterable

import trio


class Flight:
    __slots__ = ("digest", "event", "data", "error", "source", "waiters")

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.event = trio.Event()
        self.data: bytes | bytearray | memoryview | None = None
        self.error: BaseException | None = None
        self.source = ""   # the tier that produced the data: memory, disk, peer, origin
        self.waiters = 0   # readers besides the owner (an owner that fills a caller's
                           # memory makes a copy only for them)

    @property
    def done(self) -> bool:
        return self.event.is_set()


class FlightTable:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, digest: object) -> bool:
        return digest in self._flights

    def get(self, digest: str) -> Flight | None:
        return self._flights.get(digest)

    def claim(self, digests: Iterable[str]) -> tuple[list[Flight], list[bool]]:
        """A flight per digest, in order, and for each whether the caller now owns it (it
        was not in flight). A digest given twice is owned once and joined once."""
        flights: list[Flight] = []
        owned: list[bool] = []
        for digest in digests:
            f = self._flights.get(digest)
            if f is None:
                f = self._flights[digest] = Flight(digest)
                owned.append(True)
            else:
                owned.append(False)
            flights.append(f)
        return flights, owned

    def join(self, digest: str) -> Flight | None:
        """The flight of `digest`, counted as one more waiter; None if none is in flight."""
        f = self._flights.get(digest)
        if f is not None:
            f.waiters += 1
        return f

    def land(self, f: Flight, data: bytes | bytearray | memoryview | None, source: str) -> bool:
        """End `f` with data (None: its owner's buffer is not shareable and nobody waited).
        False if it had already ended."""
        return self._end(f, data, None, source)

    def fail(self, f: Flight, error: BaseException) -> bool:
        """End `f` with an error. False if it had already ended."""
        return self._end(f, None, error, "")

    def _end(self, f: Flight, data, error: BaseException | None, source: str) -> bool:
        if f.event.is_set():
            return False
        if self._flights.get(f.digest) is f:
            del self._flights[f.digest]
        f.data, f.error, f.source = data, error, source
        f.event.set()
        return True
