"""Connection slots: at most `limit` client connections served at once, and who gives way
when they are all taken and another connection waits.

A connection that has held its slot for `grace` seconds without delivering a whole request
head (idle between requests, silent since it connected, or its head still trickling in: a
slowloris) gives the slot up to a waiting connection, the longest such first. Eviction
hands the slot over at once (the limiter passes the token to its longest waiter, FIFO) and
cancels the victim's wait, so each eviction serves exactly one waiter: a waiter evicts again
only if the slot it freed went to someone who had waited longer.

Invariants (trio thread only; nothing here awaits between reading and changing state):
a `Claim` holds one of the limiter's tokens exactly while `claim.held`; a claim is in
`_unready` only while its connection is inside `evictable()`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import trio


class Claim:
    """One connection's slot: the limiter's borrower, and the scope an eviction cancels."""

    __slots__ = ("held", "scope")

    def __init__(self) -> None:
        self.held = False
        self.scope: trio.CancelScope | None = None


class Slots:
    def __init__(self, limit: int, *, grace: float, clock: Callable[[], float]) -> None:
        self._limiter = trio.CapacityLimiter(limit)
        self._grace, self._clock = grace, clock
        #: Claims waiting for a request head, by when they began, oldest first (dicts keep
        #: insertion order, and the clock only goes forward).
        self._unready: dict[Claim, float] = {}
        #: Connections inside claim() without a slot yet.
        self.waiting = 0

    @property
    def open(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def unready(self) -> int:
        return len(self._unready)

    @property
    def contended(self) -> bool:
        """Someone waits for a slot: a connection should close rather than go idle."""
        return self.waiting > 0

    def try_claim(self) -> Claim | None:
        claim = Claim()
        try:
            self._limiter.acquire_on_behalf_of_nowait(claim)
        except trio.WouldBlock:
            return None
        claim.held = True
        return claim

    async def claim(self, deadline: float) -> Claim | None:
        """A slot by `deadline` (None: none came free), evicting for it as above."""
        claim = Claim()
        self.waiting += 1
        try:
            while True:
                look_again = self._evict_one(self._clock())
                try:
                    # At once if the eviction freed a slot nobody waited longer for.
                    self._limiter.acquire_on_behalf_of_nowait(claim)
                except trio.WouldBlock:
                    with trio.move_on_at(min(deadline, look_again)):
                        await self._limiter.acquire_on_behalf_of(claim)
                        claim.held = True
                        return claim
                    if self._clock() >= deadline:
                        return None
                else:
                    claim.held = True
                    return claim
        finally:
            self.waiting -= 1

    def release(self, claim: Claim) -> None:
        if claim.held:
            claim.held = False
            self._limiter.release_on_behalf_of(claim)

    @contextmanager
    def evictable(self, claim: Claim, since: float) -> Iterator[trio.CancelScope]:
        """Around waiting for a request head, which began at `since`: the scope is
        cancelled, and `claim.held` turns False, if a waiting connection evicts it."""
        scope = trio.CancelScope()
        claim.scope = scope
        self._unready[claim] = since
        try:
            with scope:
                yield scope
        finally:
            self._unready.pop(claim, None)
            claim.scope = None

    def _evict_one(self, now: float) -> float:
        """Evict the oldest claim if it has waited `grace`; returns when the oldest left
        will have (inf: none waits for a head)."""
        oldest = next(iter(self._unready.items()), None)
        if oldest is not None and now >= oldest[1] + self._grace:
            claim = oldest[0]
            del self._unready[claim]
            self.release(claim)
            assert claim.scope is not None
            claim.scope.cancel()
        since = next(iter(self._unready.values()), None)
        return math.inf if since is None else since + self._grace
