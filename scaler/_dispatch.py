"""The queue proxy's pure core: per-replica concurrency limits, a bounded FIFO queue
with a deadline, least-loaded routing, retries, and the concurrency signal.

No sockets, no clocks (callers pass `now`), no trio: the shell (`_proxy.py`) owns the
waiting. Invariant: a ticket is in exactly one of {queued, assigned, finished}, and an
endpoint's `in_flight` equals the number of tickets assigned to it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ._policy import Sample


@dataclass(frozen=True)
class Endpoint:
    id: str
    host: str
    port: int


@dataclass(eq=False)
class Ticket:
    """One request's place in the proxy."""

    id: int
    enqueued_at: float
    deadline: float
    endpoint: Endpoint | None = None
    attempts: int = 0
    #: Endpoints that failed this request; it is not sent to them again.
    exclude: set[str] = field(default_factory=set)
    #: The shell's handle (a trio.Event); the core never looks at it.
    token: Any = None
    started_at: float | None = None


@dataclass
class _Slot:
    endpoint: Endpoint
    in_flight: int = 0
    routable: bool = True


@dataclass(frozen=True)
class DispatchStats:
    in_flight: int
    queued: int
    endpoints: int
    accepted: int
    served: int
    rejected_full: int
    rejected_timeout: int
    failed: int
    retries: int
    queue_delay_sum_s: float
    queue_delay_count: int

    @property
    def concurrency(self) -> int:
        return self.in_flight + self.queued


class QueueFull(Exception):
    """No room in the queue (the shell answers 503)."""


class Dispatcher:
    def __init__(self, *, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._slots: dict[str, _Slot] = {}
        self._queue: deque[Ticket] = deque()
        self._ids = itertools.count()
        self._in_flight = 0
        self._accepted = self._served = self._rejected_full = self._rejected_timeout = 0
        self._failed = self._retries = 0
        self._delay_sum, self._delay_n = 0.0, 0
        # Sampling: time integrals since the last sample().
        self._t: float | None = None
        self._area_conc = self._area_queued = self._area_busy = self._area_cap = 0.0
        self._arrived, self._svc_sum, self._svc_n = 0, 0.0, 0
        self._sample_t: float | None = None

    # ---------------------------------------------------------------- endpoints
    def add_endpoint(self, ep: Endpoint, now: float) -> list[Ticket]:
        self._advance(now)
        slot = self._slots.get(ep.id)
        if slot is None:
            self._slots[ep.id] = _Slot(ep)
        else:
            slot.routable = True
        return self._pump(now)

    def remove_endpoint(self, ep_id: str, now: float) -> int:
        """Stop routing to it; returns its in-flight count (it leaves when that is 0)."""
        self._advance(now)
        slot = self._slots.get(ep_id)
        if slot is None:
            return 0
        slot.routable = False
        if slot.in_flight == 0:
            del self._slots[ep_id]
        return slot.in_flight

    def in_flight(self, ep_id: str) -> int:
        slot = self._slots.get(ep_id)
        return slot.in_flight if slot else 0

    def routable(self) -> list[Endpoint]:
        return [s.endpoint for s in self._slots.values() if s.routable]

    # ---------------------------------------------------------------- requests
    def submit(self, now: float, *, deadline: float | None = None) -> Ticket:
        """A new request: assigned at once if a slot is free and nobody waits, else
        queued until `queue_timeout_s` from now, or until `deadline` if that is sooner
        (a request that already waited for a connection slot). Raises QueueFull."""
        self._advance(now)
        self.expire(now)
        if len(self._queue) >= self.max_queue:
            self._rejected_full += 1
            raise QueueFull
        until = now + self.queue_timeout_s
        t = Ticket(next(self._ids), now, until if deadline is None else min(until, deadline))
        self._accepted += 1
        self._arrived += 1
        self._queue.append(t)
        self._pump(now)
        return t

    def expire(self, now: float) -> list[Ticket]:
        """Queued tickets past their deadline, removed (the shell answers 503)."""
        self._advance(now)
        out = [t for t in self._queue if t.deadline <= now]
        if out:
            self._queue = deque(t for t in self._queue if t.deadline > now)
            self._rejected_timeout += len(out)
        return out

    def cancel(self, t: Ticket, now: float) -> list[Ticket]:
        """The client left (or the shell gave up): forget the ticket wherever it is."""
        self._advance(now)
        if t.endpoint is None:
            try:
                self._queue.remove(t)
            except ValueError:
                pass
            return []
        return self._release(t, now)

    def finish(self, t: Ticket, now: float, service_s: float | None = None) -> list[Ticket]:
        """The replica answered: free the slot; returns tickets that got one."""
        self._advance(now)
        self._served += 1
        if service_s is not None:
            self._svc_sum += service_s
            self._svc_n += 1
        return self._release(t, now)

    def fail(self, t: Ticket, now: float, *, retry: bool) -> list[Ticket]:
        """The replica died before answering. The endpoint stops taking requests; with
        `retry` the ticket goes back to the head of the queue (it has waited longest)
        and will avoid that endpoint."""
        self._advance(now)
        ep = t.endpoint
        assert ep is not None
        # Unroutable before the slot is freed, or the freed slot would go to a waiter.
        slot = self._slots.get(ep.id)
        if slot is not None:
            slot.routable = False
        woken = self._release(t, now)
        t.exclude.add(ep.id)
        if retry:
            self._retries += 1
            t.endpoint = None
            self._queue.appendleft(t)
            return [*woken, *self._pump(now)]
        self._failed += 1
        return woken

    def _release(self, t: Ticket, now: float) -> list[Ticket]:
        ep, t.endpoint = t.endpoint, None
        if ep is not None:
            slot = self._slots.get(ep.id)
            if slot is not None:
                slot.in_flight -= 1
                self._in_flight -= 1
                if not slot.routable and slot.in_flight == 0:
                    del self._slots[ep.id]
        return self._pump(now)

    def _pump(self, now: float) -> list[Ticket]:
        """Assign queue heads to the least-loaded routable endpoint with a free slot."""
        woken: list[Ticket] = []
        while self._queue:
            head = self._queue[0]
            best: _Slot | None = None
            for slot in self._slots.values():
                if (slot.routable and slot.in_flight < self.max_concurrency
                        and slot.endpoint.id not in head.exclude
                        and (best is None or slot.in_flight < best.in_flight)):
                    best = slot
            if best is None:
                break
            self._queue.popleft()
            best.in_flight += 1
            self._in_flight += 1
            head.endpoint = best.endpoint
            head.attempts += 1
            if head.started_at is None:
                head.started_at = now
                self._delay_sum += now - head.enqueued_at
                self._delay_n += 1
            woken.append(head)
        return woken

    # ---------------------------------------------------------------- signal
    def _advance(self, now: float) -> None:
        if self._t is None:
            self._t = self._sample_t = now
            return
        dt = now - self._t
        if dt > 0:
            q = len(self._queue)
            self._area_conc += dt * (self._in_flight + q)
            self._area_queued += dt * q
            self._area_busy += dt * sum(s.in_flight for s in self._slots.values() if s.routable)
            self._area_cap += dt * self.max_concurrency * sum(s.routable for s in self._slots.values())
            self._t = now

    def sample(self, now: float) -> Sample:
        """Time averages since the previous sample (the policy's input)."""
        self._advance(now)
        t0 = self._sample_t if self._sample_t is not None else now
        dt = now - t0
        if dt <= 0:
            q = float(len(self._queue))
            return Sample(concurrency=self._in_flight + q, queued=q)
        s = Sample(concurrency=self._area_conc / dt, queued=self._area_queued / dt,
                   busy=self._area_busy / dt, capacity=self._area_cap / dt,
                   arrival_rate=self._arrived / dt,
                   service_s=self._svc_sum / self._svc_n if self._svc_n else 0.0,
                   completed=float(self._svc_n))
        self._area_conc = self._area_queued = self._area_busy = self._area_cap = 0.0
        self._arrived, self._svc_sum, self._svc_n = 0, 0.0, 0
        self._sample_t = now
        return s

    def statistics(self) -> DispatchStats:
        return DispatchStats(
            in_flight=self._in_flight, queued=len(self._queue),
            endpoints=sum(s.routable for s in self._slots.values()), accepted=self._accepted,
            served=self._served, rejected_full=self._rejected_full,
            rejected_timeout=self._rejected_timeout, failed=self._failed,
            retries=self._retries, queue_delay_sum_s=self._delay_sum,
            queue_delay_count=self._delay_n)
