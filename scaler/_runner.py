"""How one replica is made runnable, run and cleaned up: the part that differs between
local processes and containers. `LocalActuator` owns the lifecycle (spawn, probe, route,
drain, stop) and asks a `Runner` for the rest:

    prepare(id, port) -> Prepared    before the process: pull, host setup, create (timed)
    argv(id, port)                   the foreground process whose life is the replica's,
                                     started in its own process group
    signal(id, pid, sig)             deliver a stop signal (SIGTERM, later SIGKILL) to the
                                     replica: to the group for a process, to the task
                                     through containerd for a container
    cleanup(id)                      after it ended, however it ended (idempotent; also
                                     after a failed prepare)

`ProcessRunner` runs `replica_cmd` itself; `ContainerdRunner` (`_containerd.py`) runs
`ctr tasks start` of a container it created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Prepared:
    #: Seconds pulling the image and creating the container (0 for a local process).
    image_s: float = 0.0
    #: Seconds of the host setup command (counted in the weights stage).
    setup_s: float = 0.0


class Runner(Protocol):
    async def prepare(self, replica_id: str, port: int) -> Prepared: ...

    def argv(self, replica_id: str, port: int) -> list[str]: ...

    async def signal(self, replica_id: str, pid: int, sig: int) -> None: ...

    async def cleanup(self, replica_id: str) -> None: ...


class ProcessRunner:
    """`replica_cmd` through /bin/sh, `{port}` filled in."""

    def __init__(self, replica_cmd: str) -> None:
        self.replica_cmd = replica_cmd

    async def prepare(self, replica_id: str, port: int) -> Prepared:
        return Prepared()

    def argv(self, replica_id: str, port: int) -> list[str]:
        return ["/bin/sh", "-c", f"exec {self.replica_cmd.replace('{port}', str(port))}"]

    async def signal(self, replica_id: str, pid: int, sig: int) -> None:
        signal_group(pid, sig)

    async def cleanup(self, replica_id: str) -> None:
        return None


def signal_group(pid: int, sig: int) -> None:
    """`sig` to the process group `pid` leads (one the actuator created for the replica,
    with start_new_session); nothing if it is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
