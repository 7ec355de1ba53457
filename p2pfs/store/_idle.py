"""How many CPUs of this machine were idle lately: what the write-back may use.

Read from /proc/stat (idle + iowait time of all CPUs), at most once per `WINDOW`: the
idle CPUs are the idle seconds gained between two samples over the seconds between them.
Until two samples are taken it says "not enough" (a caller waits one window); a machine
that cannot tell (no /proc) never holds write-back back. The figure is the
machine's, not a cgroup's: inside a CPU quota it can say "idle" while the quota is spent.
"""

from __future__ import annotations

import os
import time
from typing import Callable


def proc_stat_idle(path: str = "/proc/stat") -> float | None:
    """Seconds all CPUs have spent idle (or waiting for I/O) since boot; None if unknown."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class IdleCpus:
    WINDOW = 0.1  # seconds between samples

    def __init__(self, need: float, read: Callable[[], float | None] = proc_stat_idle,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.need = need
        self._read = read
        self._clock = clock
        self._last: tuple[float, float] | None = None
        self.idle = 0.0  # idle CPUs at the last measurement (none until two samples)

    def enough(self) -> bool:
        """Whether at least `need` CPUs were idle over the last sample window."""
        if self.need <= 0:
            return True
        now = self._clock()
        if self._last is None or now - self._last[0] >= self.WINDOW:
            idle_s = self._read()
            if idle_s is None:
                return True
            if self._last is not None:
                self.idle = max(0.0, idle_s - self._last[1]) / (now - self._last[0])
            self._last = (now, idle_s)
        return self.idle >= self.need
