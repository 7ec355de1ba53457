"""The control loop: samples the dispatcher, asks the policy, tells the actuator.

It also implements the actuator's `Hooks` on top of the dispatcher, so the actuator never
sees the queue. Structured: `run` is a long-lived task in its owner's nursery.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from ._actuator import Actuator
from ._dispatch import Dispatcher, Endpoint, Ticket
from ._metrics import Snapshot
from ._policy import ConcurrencyPolicy, Decision, Policy, Sample

log = logging.getLogger("scaler.controller")


class Controller:
    def __init__(self, policy: Policy, dispatcher: Dispatcher, actuator: Actuator, *,
                 wake: Callable[[list[Ticket]], None],
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.policy, self.dispatcher, self.actuator = policy, dispatcher, actuator
        self._wake = wake  # the proxy's: wakes requests the dispatcher assigned
        self._clock = clock
        self._poke = trio.Event()
        self.decision = Decision(serving=0)
        self.decisions: list[tuple[float, Decision]] = []  # bounded below; for tests/logs

    # ---------------------------------------------------------------- hooks
    def ready(self, ep: Endpoint) -> None:
        log.info("replica %s ready at %s:%d", ep.id, ep.host, ep.port)
        self._wake(self.dispatcher.add_endpoint(ep, self._clock()))

    async def drain(self, ep_id: str, timeout: float) -> None:
        self.dispatcher.remove_endpoint(ep_id, self._clock())
        with trio.move_on_after(timeout):
            while self.dispatcher.in_flight(ep_id) > 0:
                await trio.sleep(0.02)

    def gone(self, ep_id: str) -> None:
        self.dispatcher.remove_endpoint(ep_id, self._clock())

    # ---------------------------------------------------------------- loop
    def poke(self) -> None:
        """A request arrived with nothing serving: decide now, not at the next tick."""
        self._poke.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sample_s, tick_s = self.policy.sample_s, self.policy.tick_s
        next_sample = next_tick = self._clock()
        task_status.started()
        while True:
            with trio.move_on_at(min(next_sample, next_tick)):
                await self._poke.wait()
            now = self._clock()
            poked = self._poke.is_set()
            if poked:
                self._poke = trio.Event()
                s = self.dispatcher.statistics()
                # The activator's way: the newest instantaneous concurrency as a sample.
                self.policy.record(now, Sample(concurrency=float(s.concurrency),
                                              queued=float(s.queued)))
            if now >= next_sample:
                self.policy.record(now, self.dispatcher.sample(now))
                next_sample = now + sample_s
            if poked or now >= next_tick:
                self._decide(now)
                if not poked:
                    next_tick = now + tick_s

    def _decide(self, now: float) -> None:
        d = self.policy.decide(now, self.actuator.fleet())
        if (d.serving, d.standby) != (self.decision.serving, self.decision.standby):
            log.info("scale to %d serving + %d standby (%s)", d.serving, d.standby, d.mode)
            self.decisions.append((now, d))
            del self.decisions[:-1000]
        self.decision = d
        self.actuator.set_target(d.serving, d.standby)

    def snapshot(self) -> Snapshot:
        s = self.dispatcher.statistics()
        f = self.actuator.fleet()
        p = self.policy
        stable = panic = 0.0
        panicking = False
        if isinstance(p, ConcurrencyPolicy):
            now = self._clock()
            stable, panic = p.averages(now)
            panicking = p.panicking
        return Snapshot(
            in_flight=s.in_flight, queued=s.queued, ready=f.ready, starting=f.starting,
            standby=f.standby, desired=self.decision.serving, stable_concurrency=stable,
            panic_concurrency=panic, panicking=panicking, accepted=s.accepted, served=s.served,
            rejected_full=s.rejected_full, rejected_timeout=s.rejected_timeout,
            failed=s.failed, retries=s.retries, queue_delay_sum_s=s.queue_delay_sum_s,
            queue_delay_count=s.queue_delay_count, **self._start_metrics())

    def _start_metrics(self) -> dict:
        starts = self.actuator.start_records()
        sums = self.actuator.start_sums()
        last: tuple = ()
        if starts:
            newest = starts[-1]
            last = tuple((newest.kind, k, v) for k, v in newest.stages().items() if v is not None)
        return {"start_sums": tuple((kind, stage, n, total)
                                    for (kind, stage), (n, total) in sorted(sums.items())),
                "last_start": last}

    def status(self) -> dict:
        """The `/-/status` document (docs/FORMAT.md, "Scaler status"): replicas by state, the
        decision, the queue, every replica and the newest starts with their stages."""
        s = self.dispatcher.statistics()
        f = self.actuator.fleet()
        replicas = self.actuator.replicas()
        by_state: dict[str, int] = {"starting": 0, "standby": 0, "serving": 0, "stopping": 0}
        for r in replicas:
            by_state[r["state"]] = by_state.get(r["state"], 0) + 1
        if not replicas:  # an actuator that sees no replicas one by one (Kubernetes)
            by_state.update(serving=f.ready, starting=f.starting, standby=f.standby)
        return {
            "replicas": by_state,
            "desired": {"serving": self.decision.serving, "standby": self.decision.standby,
                        "mode": self.decision.mode},
            "queue": {"in_flight": s.in_flight, "queued": s.queued, "accepted": s.accepted,
                      "served": s.served, "rejected_full": s.rejected_full,
                      "rejected_timeout": s.rejected_timeout, "failed": s.failed},
            "replica_list": replicas,
            "starts": [st.as_dict() for st in self.actuator.start_records()][-20:],
        }
