"""Replicas as local processes or containers: the lifecycle every node-local actuator shares.

Each replica gets a free loopback port; its `Runner` prepares it (nothing for a process;
pull and create for a container), then its foreground process is started in its own
process group (so stopping it stops its children), and it is ready when GET `ready_path`
answers 2xx. A standby replica is started and ready but not routed to: promoting it is
instant. Every replica lives in a task of the actuator's own nursery; cancelling `run`
stops them all (SIGTERM, then SIGKILL after `stop_timeout_s`, then the runner's cleanup).
Each start is timed stage by stage (`_starts.py`): `starts` holds the records.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import subprocess
from dataclasses import dataclass, field

import trio

from . import _http
from ._actuator import Hooks
from ._config import LocalConfig
from ._dispatch import Endpoint
from ._errors import ActuatorError, ProtocolError, ReplicaError
from ._policy import Fleet
from ._runner import Prepared, ProcessRunner, Runner, signal_group as _signal_group
from ._starts import Start, StartLog, parse_ready_body

log = logging.getLogger("scaler.local")


def free_port(host: str) -> int:
    # Another process could take it before the replica binds; on loopback, with the
    # kernel handing out ephemeral ports in sequence, that race is rare, and a replica
    # that fails to start is simply replaced.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class _Replica:
    id: str
    port: int
    role: str                 # "serving" or "standby": what it is for
    ready: bool = False       # probe answered
    routed: bool = False      # the router sends it requests
    stopping: bool = False
    process: trio.Process | None = None
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    start: Start | None = None


class LocalActuator:
    def __init__(self, config: LocalConfig, runner: Runner | None = None) -> None:
        if not config.replica_cmd:
            raise ActuatorError("LocalActuator needs replica_cmd")
        self.config = config
        self.runner: Runner = runner or ProcessRunner(config.replica_cmd)
        self.starts = StartLog()
        self._decided: float | None = None  # when the target last changed, until acted on
        self._replicas: dict[str, _Replica] = {}
        self._ids = itertools.count(1)
        self._target = (0, 0)
        self._changed = trio.Event()
        self._hooks: Hooks | None = None
        self._nursery: trio.Nursery | None = None
        self.started = 0   # replicas ever started (tests, metrics)
        self.failed = 0    # replicas that exited or failed to start unasked
        self._failures_in_a_row = 0

    # ---------------------------------------------------------------- interface
    def set_target(self, serving: int, standby: int) -> None:
        if (serving, standby) != self._target:
            self._target = (serving, standby)
            if self._decided is None:
                self._decided = trio.current_time()
            self._changed.set()

    def fleet(self) -> Fleet:
        live = [r for r in self._replicas.values() if not r.stopping]
        return Fleet(ready=sum(r.routed for r in live),
                     starting=sum(r.role == "serving" and not r.routed for r in live),
                     standby=sum(r.role == "standby" for r in live))

    def endpoint_failed(self, ep_id: str) -> None:
        r = self._replicas.get(ep_id)
        if r is not None and not r.stopping:
            log.warning("replica %s failed a request; replacing it", ep_id)
            self.failed += 1
            r.stopping = True
            r.routed = False
            r.cancel.cancel()
            self._changed.set()

    def endpoint_answered(self, ep_id: str) -> None:
        """The router got an answer from this endpoint: the first one ends its start."""
        s = self.starts.answered(ep_id, trio.current_time())
        if s is not None:
            log.info("%s", s.log_line())

    def replicas(self) -> list[dict]:
        """Every replica now, for status: id, role, state and its newest start."""
        out = []
        for r in self._replicas.values():
            state = ("stopping" if r.stopping else "serving" if r.routed
                     else "standby" if r.role == "standby" and r.ready else "starting")
            s = self.starts.latest(r.id)
            out.append({"id": r.id, "role": r.role, "state": state, "port": r.port,
                        "start": s.as_dict() if s is not None else None})
        return out

    def start_records(self) -> list[Start]:
        return self.starts.recent()

    def start_sums(self) -> dict[tuple[str, str], tuple[int, float]]:
        return dict(self.starts.sums)

    def pids(self) -> list[int]:
        return [r.process.pid for r in self._replicas.values() if r.process is not None]

    async def run(self, hooks: Hooks, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._hooks = hooks
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    self._reconcile(self._decided if self._decided is not None
                                    else trio.current_time())
                    self._decided = None
                    self._changed = trio.Event()
                    await self._changed.wait()
            finally:
                nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- convergence
    def _reconcile(self, decided: float) -> None:
        """Bring the replicas to the target. Sync: only flips states and starts tasks.
        `decided`: when the target it acts on was set (the starts' clock zero)."""
        serving_target, standby_target = self._target
        live = [r for r in self._replicas.values() if not r.stopping]
        serving = [r for r in live if r.role == "serving"]
        standby = [r for r in live if r.role == "standby"]
        if len(serving) < serving_target:
            need = serving_target - len(serving)
            # Ready standby first (instant), then ones still starting.
            for r in sorted(standby, key=lambda r: not r.ready)[:need]:
                r.role = "serving"
                standby.remove(r)
                if r.ready:
                    self._route(r)
                    self.starts.begin(Start(r.id, "promotion", "standby", decided,
                                            ready=trio.current_time()))
                elif r.start is not None:
                    r.start.role = "serving"
                need -= 1
            for _ in range(need):
                self._spawn("serving", decided)
        elif len(serving) > serving_target:
            # Least sunk cost first: not ready yet, then the newest ready ones.
            newest_first = sorted(serving, key=lambda r: int(r.id.rsplit("-", 1)[1]), reverse=True)
            victims = [r for r in newest_first if not r.ready] + [r for r in newest_first if r.ready]
            for r in victims[:len(serving) - serving_target]:
                if len(standby) < standby_target:
                    standby.append(r)
                    self._demote(r)
                else:
                    self._stop(r)
        for _ in range(standby_target - len(standby)):
            self._spawn("standby", decided)
        for r in sorted(standby, key=lambda r: r.ready)[:max(0, len(standby) - standby_target)]:
            self._stop(r)

    def _spawn(self, role: str, decided: float) -> None:
        assert self._nursery is not None
        r = _Replica(id=f"replica-{next(self._ids)}", port=free_port(self.config.host), role=role)
        r.start = self.starts.begin(Start(r.id, "cold", role, decided))
        self._replicas[r.id] = r
        self.started += 1
        self._nursery.start_soon(self._lifetime, r)

    def _route(self, r: _Replica) -> None:
        assert self._hooks is not None
        r.routed = True
        self._hooks.ready(Endpoint(r.id, self.config.host, r.port))

    def _demote(self, r: _Replica) -> None:
        r.role = "standby"
        if r.routed:
            r.routed = False
            assert self._nursery is not None
            self._nursery.start_soon(self._hooks.drain, r.id, self.config.drain_timeout_s)  # type: ignore[union-attr]

    def _stop(self, r: _Replica) -> None:
        r.stopping = True
        r.cancel.cancel()

    # ---------------------------------------------------------------- one replica
    async def _lifetime(self, r: _Replica) -> None:
        """Prepare, start, probe, serve until stopped or dead, then drain, stop, clean up."""
        assert self._hooks is not None and r.start is not None
        start = r.start
        try:
            with r.cancel:
                if self._failures_in_a_row:
                    c = self.config
                    wait = min(c.max_restart_backoff_s,
                               c.restart_backoff_s * 2 ** min(self._failures_in_a_row - 1, 30))
                    log.info("replica %s waits %.1fs: %d failed starts in a row", r.id, wait,
                             self._failures_in_a_row)
                    await trio.sleep(wait)
                start.began = trio.current_time()
                try:
                    prepared: Prepared = await self.runner.prepare(r.id, r.port)
                except ActuatorError as exc:
                    log.warning("replica %s could not be prepared: %s", r.id, exc)
                    self.starts.failed(start, str(exc))
                    self._failed_start()
                    return
                start.image_s, start.setup_s = prepared.image_s, prepared.setup_s
                proc = await trio.lowlevel.open_process(
                    self.runner.argv(r.id, r.port), start_new_session=True,
                    stdin=subprocess.DEVNULL)
                r.process = proc
                start.process_started = trio.current_time()
                try:
                    body = await self._probe(r, proc)
                except ReplicaError as exc:
                    log.warning("replica %s did not start: %s", r.id, exc)
                    self.starts.failed(start, str(exc))
                    self._failed_start()
                    return
                start.ready = trio.current_time()
                start.reported_weights_s = parse_ready_body(body)
                r.ready = True
                self._failures_in_a_row = 0
                log.info("replica %s ready (%s): %s", r.id, r.role,
                         ", ".join(f"{k} {v:.2f}s" for k, v in start.stages().items()
                                   if v is not None))
                if r.role == "serving":
                    self._route(r)
                await proc.wait()
                log.warning("replica %s exited with %s", r.id, proc.returncode)
                self._failed_start()
                self._hooks.gone(r.id)
        except OSError as exc:
            log.error("cannot start replica %s: %s", r.id, exc)
            self.starts.failed(start, str(exc))
            self._failed_start()
        finally:
            r.stopping = True
            if start.ready is None:
                self.starts.failed(start, "stopped before it was ready")
            with trio.CancelScope(shield=True):
                if r.routed:
                    r.routed = False
                    await self._hooks.drain(r.id, self.config.drain_timeout_s)
                if r.process is not None:
                    await self._terminate(r, r.process)
                with trio.move_on_after(self.config.stop_timeout_s + 30):
                    await self.runner.cleanup(r.id)
            del self._replicas[r.id]
            self.starts.forget(r.id)
            self._changed.set()

    def _failed_start(self) -> None:
        self.failed += 1
        self._failures_in_a_row += 1

    async def _probe(self, r: _Replica, proc: trio.Process) -> bytes:
        """Until GET ready_path answers 2xx: its body (it may report the load time)."""
        with trio.move_on_after(self.config.start_timeout_s):
            while proc.poll() is None:
                try:
                    resp = await _http.get(self.config.host, r.port, self.config.ready_path,
                                           timeout=max(1.0, self.config.probe_interval_s))
                    if 200 <= resp.status < 300:
                        return resp.body
                except (ReplicaError, ProtocolError):
                    pass  # not listening yet, or not speaking HTTP yet: not ready
                await trio.sleep(self.config.probe_interval_s)
            raise ReplicaError(f"exited with {proc.returncode} before ready")
        raise ReplicaError(f"not ready within {self.config.start_timeout_s}s")

    async def _terminate(self, r: _Replica, proc: trio.Process) -> None:
        """SIGTERM through the runner (again each second: a container's task may not
        exist yet when the first is sent), SIGKILL after stop_timeout_s, and only then,
        if the foreground process still lives, SIGKILL to its group."""
        if proc.returncode is not None or proc.poll() is not None:
            return
        with trio.move_on_after(self.config.stop_timeout_s):
            while proc.poll() is None:
                await self.runner.signal(r.id, proc.pid, signal.SIGTERM)
                with trio.move_on_after(1.0):
                    await proc.wait()
        if proc.returncode is None:
            await self.runner.signal(r.id, proc.pid, signal.SIGKILL)
            with trio.move_on_after(5.0):
                await proc.wait()
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
