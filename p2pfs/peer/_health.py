"""Passive per-peer health, bans, and the hedge budget (pure: every call takes `now`).

Two ways out of the ring, for two kinds of fault:

- *down* (health): timeouts, refusals and 503s. `fail_threshold` failures in a row (no
  success between them) within `fail_window` seconds take a peer out for `down_for`
  seconds; then it is asked again, on probation: until its next success one failure
  takes it out again, each time for twice as long (up to 16x `down_for`). This covers a
  peer that died before DNS noticed, and one that accepts connections but never answers
  (SIGSTOPped), which would otherwise cost a stall timeout every `down_for` seconds.
- *banned*: bytes that failed their digest, or answers that break the protocol. A ban lasts
  `ban_base` seconds and doubles with each new ban, up to `ban_max`; a peer that stayed
  clean for `ban_max` seconds after its last ban starts again from `ban_base`. A ban while
  already banned (several bad answers in flight at once) does not double.

Memory is bounded: latencies are a ring of the last `samples` successes (all peers), and a
peer that has been quiet for `forget_after` seconds and holds no ban history is forgotten.
Not thread-safe: one trio thread owns an instance.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

State = Literal["up", "down", "banned"]


@dataclass
class _Peer:
    last_seen: float
    streak: deque = field(default_factory=deque)  # times of failures since the last success
    down_until: float = -math.inf
    banned_until: float = -math.inf
    bans: int = 0
    downs: int = 0  # down periods since the last success (probation: doubles the next)
    failures: int = 0
    successes: int = 0
    last_error: str = ""


class PeerHealth:
    def __init__(self, *, fail_window: float = 10.0, fail_threshold: int = 3,
                 down_for: float = 5.0, ban_base: float = 30.0, ban_max: float = 3600.0,
                 samples: int = 1024, forget_after: float = 600.0) -> None:
        if fail_threshold < 1 or samples < 1:
            raise ValueError("fail_threshold and samples must be >= 1")
        if not (fail_window > 0 and down_for > 0 and 0 < ban_base <= ban_max):
            raise ValueError("need fail_window > 0, down_for > 0, 0 < ban_base <= ban_max")
        self.fail_window = fail_window
        self.fail_threshold = fail_threshold
        self.down_for = down_for
        self.ban_base = ban_base
        self.ban_max = ban_max
        self.forget_after = forget_after
        self._peers: dict[str, _Peer] = {}
        self._latencies: deque[float] = deque(maxlen=samples)
        self._sorted: list[float] | None = None
        self._pruned_at = -math.inf

    def _get(self, peer: str, now: float) -> _Peer:
        self._prune(now)
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer(last_seen=now)
        p.last_seen = max(p.last_seen, now)
        return p

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < self.forget_after / 8:
            return
        self._pruned_at = now
        for peer in [k for k, p in self._peers.items() if self._forgettable(p, now)]:
            del self._peers[peer]

    def _forgettable(self, p: _Peer, now: float) -> bool:
        return (now - p.last_seen >= self.forget_after and now >= p.down_until
                and now - p.banned_until >= self.ban_max)

    def success(self, peer: str, now: float, latency: float) -> None:
        p = self._get(peer, now)
        p.successes += 1
        p.streak.clear()
        p.downs = 0
        self._latencies.append(latency)
        self._sorted = None

    def failure(self, peer: str, now: float, reason: str = "") -> None:
        """A timeout, refusal or 503: lowers health, never bans."""
        p = self._get(peer, now)
        p.failures += 1
        if reason:
            p.last_error = reason
        if now < p.down_until or now < p.banned_until:
            return  # already out; an answer still in flight says nothing new
        p.streak.append(now)
        while p.streak and now - p.streak[0] > self.fail_window:
            p.streak.popleft()
        # On probation (down before, no success since) one failure is enough, and each
        # down period doubles, up to 16x down_for: a SIGSTOPped peer that accepts
        # connections costs a stall per period, so the periods must grow.
        if len(p.streak) >= (1 if p.downs else self.fail_threshold):
            p.down_until = now + self.down_for * 2 ** min(p.downs, 4)
            p.downs += 1
            p.streak.clear()

    def ban(self, peer: str, now: float, reason: str) -> float:
        """Integrity or protocol failure: ban the peer; returns how long the ban lasts."""
        p = self._get(peer, now)
        p.last_error = reason
        if now < p.banned_until:
            return p.banned_until - now
        if now - p.banned_until >= self.ban_max:
            p.bans = 0  # clean for long enough: forgive the history
        length = min(self.ban_base * 2 ** min(p.bans, 64), self.ban_max)
        p.bans += 1
        p.banned_until = now + length
        p.streak.clear()
        return length

    def state(self, peer: str, now: float) -> State:
        p = self._peers.get(peer)
        if p is None:
            return "up"
        if now < p.banned_until:
            return "banned"
        if now < p.down_until:
            return "down"
        return "up"

    def usable(self, peer: str, now: float) -> bool:
        return self.state(peer, now) == "up"

    @property
    def samples(self) -> int:
        """How many latencies the quantile is taken over."""
        return len(self._latencies)

    def latency_quantile(self, q: float) -> float | None:
        """The q-quantile (nearest rank) of recent successful latencies, None before any."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be within [0, 1]")
        if not self._latencies:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._latencies)
        s = self._sorted
        return s[max(0, math.ceil(q * len(s)) - 1)]

    def snapshot(self, now: float) -> dict[str, dict]:
        out = {}
        for peer, p in sorted(self._peers.items()):
            st = self.state(peer, now)
            until = p.banned_until if st == "banned" else p.down_until if st == "down" else None
            out[peer] = {"state": st, "until": until, "bans": p.bans, "failures": p.failures,
                         "successes": p.successes, "last_error": p.last_error}
        return out


class HedgeBudget:
    """Hedges are earned by requests: each earns `fraction` of one, up to `burst` saved.
    So over any run, hedges <= fraction * requests + initial, and never more than `burst`
    at once. It starts empty by default: a cold start (when every node reads at once) cannot
    spend hedges it has not earned."""

    def __init__(self, *, fraction: float = 0.05, burst: float = 10.0,
                 initial: float = 0.0) -> None:
        if not 0.0 <= fraction <= 1.0 or burst < 0 or not 0 <= initial <= burst:
            raise ValueError("need 0 <= fraction <= 1 and 0 <= initial <= burst")
        self.fraction = fraction
        self.burst = burst
        self._tokens = initial
        self.requests = 0
        self.hedges = 0

    def on_request(self) -> None:
        self.requests += 1
        self._tokens = min(self.burst, self._tokens + self.fraction)

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self.hedges += 1
        return True
