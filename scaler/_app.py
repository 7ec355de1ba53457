"""Wiring: the proxy, its controller and an actuator, run in one nursery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import trio

from ._actuator import Actuator
from ._config import ProxyConfig
from ._controller import Controller
from ._dispatch import Dispatcher
from ._policy import Policy
from ._proxy import QueueProxy


@dataclass
class Running:
    """Handles a started proxy hands back (tests and the CLI look at these)."""

    port: int
    dispatcher: Dispatcher
    controller: Controller
    proxy: QueueProxy
    actuator: Actuator


async def run_proxy(config: ProxyConfig, policy: Policy, actuator: Actuator, *,
                    clock: Callable[[], float] = trio.current_time,
                    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `task_status.started` gets a `Running` once listening."""
    dispatcher = Dispatcher(max_concurrency=config.max_concurrency, max_queue=config.max_queue,
                            queue_timeout_s=config.queue_timeout_s)
    controller = Controller(policy, dispatcher, actuator, wake=QueueProxy.wake, clock=clock)
    proxy = QueueProxy(config, dispatcher, snapshot=controller.snapshot, poke=controller.poke,
                       replica_failed=actuator.endpoint_failed,
                       replica_answered=actuator.endpoint_answered, status=controller.status,
                       clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(actuator.run, controller)
        await nursery.start(controller.run)
        port = await nursery.start(proxy.serve)
        task_status.started(Running(port, dispatcher, controller, proxy, actuator))
