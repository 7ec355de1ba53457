"""The one small interface every actuator implements, and the hooks it calls back.

An actuator owns replicas: it converges them to a target (serving, standby) in a task
its owner starts, reports what exists (`fleet`), and tells the router through `Hooks`
when an endpoint may take requests, must be drained, or is gone. Implementations:
`LocalActuator` (processes), `KubernetesActuator` (a Deployment's scale subresource).
"""

from __future__ import annotations

from typing import Protocol

import trio

from ._dispatch import Endpoint
from ._policy import Fleet
from ._starts import Start


class Hooks(Protocol):
    def ready(self, ep: Endpoint) -> None:
        """Route requests to it from now on."""

    async def drain(self, ep_id: str, timeout: float) -> None:
        """Stop routing to it and wait (at most `timeout`) for its requests to finish."""

    def gone(self, ep_id: str) -> None:
        """It died: stop routing to it at once."""


class Actuator(Protocol):
    async def run(self, hooks: Hooks, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Converge until cancelled; on the way out, stop what it started (local) or
        leave the cluster as it is (Kubernetes)."""

    def set_target(self, serving: int, standby: int) -> None:
        """The newest decision; never blocks (the run task acts on it)."""

    def fleet(self) -> Fleet: ...

    def endpoint_failed(self, ep_id: str) -> None:
        """The router saw this endpoint die before answering."""

    def endpoint_answered(self, ep_id: str) -> None:
        """The router got an answer from this endpoint (ends the start's first_answer)."""

    def replicas(self) -> list[dict]:
        """The replicas it knows of, for status (id, role, state, start)."""

    def start_records(self) -> list[Start]:
        """The newest replica starts, oldest first (empty where starts are not seen)."""

    def start_sums(self) -> dict[tuple[str, str], tuple[int, float]]:
        """(kind, stage) -> (starts counted, sum of seconds), over every start so far."""
