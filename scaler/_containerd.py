"""Replicas as containers on this node: a `Runner` over containerd's `ctr`.

For each replica: pull the image once (through CRI by default, so the p2pfs snapshotter
gets the layer labels it serves layers lazily by; later replicas wait on the same pull),
run the host setup command if one is set, then `ctr containers create` with host
networking, the configured bind mounts (read-only by default) and `replica_cmd` split
into argv (`{port}` filled in). The replica's foreground process is `ctr tasks start`.
Stop signals go to the task through containerd (`ctr tasks kill`), never to that ctr
process: killed while it is still creating the task, it would leave containerd to finish
a task nobody deletes (a shim and a `runc init` outliving everything; seen in the chain
test before this). The actuator resends SIGTERM each second, so a task created after the
first one still gets it; when the task ends, ctr exits. Cleanup then deletes the task
(until containerd says there is none) and the container (and with it its snapshot).

Container ids are `<id_prefix>-<proxy pid>-<replica id>`: two proxies on a node never
collide, and on start the actuator removes containers of its prefix whose proxy process
is gone (a proxy killed with -9 leaves them behind).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys

import trio

from ._config import ContainerdConfig
from ._errors import ActuatorError
from ._runner import Prepared

log = logging.getLogger("scaler.containerd")


class ContainerdRunner:
    def __init__(self, config: ContainerdConfig, replica_cmd: str) -> None:
        if not config.image:
            raise ActuatorError("the containerd actuator needs an image (--image)")
        if not replica_cmd:
            raise ActuatorError("the containerd actuator needs replica_cmd (--replica-cmd)")
        self.config = config
        self.replica_cmd = replica_cmd
        self._pull_lock = trio.Lock()
        self._pulled = False
        self._swept = False
        self.pull_s: float | None = None  # how long the one pull took

    def container_id(self, replica_id: str) -> str:
        return f"{self.config.id_prefix}-{os.getpid()}-{replica_id}"

    # ---------------------------------------------------------------- Runner
    async def prepare(self, replica_id: str, port: int) -> Prepared:
        began = trio.current_time()
        await self._ensure_pulled()
        setup_s = 0.0
        if self.config.setup_cmd:
            t = trio.current_time()
            cmd = self.config.setup_cmd.replace("{id}", replica_id).replace("{port}", str(port))
            await self._run(["/bin/sh", "-c", cmd], what="setup command",
                            timeout=self.config.pull_timeout_s)
            setup_s = trio.current_time() - t
        t = trio.current_time()
        # "--": ctr's flag parser would otherwise take the replica's own flags (a "-h"
        # anywhere prints ctr's help and exits 0, creating nothing).
        await self._ctr("containers", "create", *self._create_args(port), "--",
                        self.config.image, self.container_id(replica_id),
                        *self._argv_in_container(port), what="container create")
        image_s = (trio.current_time() - began) - setup_s
        return Prepared(image_s=image_s, setup_s=setup_s)

    def argv(self, replica_id: str, port: int) -> list[str]:
        return [*self._ctr_base(), "tasks", "start", self.container_id(replica_id)]

    async def signal(self, replica_id: str, pid: int, sig: int) -> None:
        await self._ctr("tasks", "kill", "-s", signal.Signals(sig).name,
                        self.container_id(replica_id), what="task kill", check=False)

    async def cleanup(self, replica_id: str) -> None:
        await self._remove(self.container_id(replica_id))

    # ---------------------------------------------------------------- pieces
    def _ctr_base(self) -> list[str]:
        return [self.config.ctr, "--address", self.config.address, "-n", self.config.namespace]

    def _create_args(self, port: int) -> list[str]:
        args = ["--snapshotter", self.config.snapshotter, "--net-host",
                "--label", f"io.p2pfs.scaler.prefix={self.config.id_prefix}"]
        for m in self.config.mounts:
            host, ctr, *mode = m.split(":")
            opts = "rbind:rw" if mode == ["rw"] else "rbind:ro"
            args += ["--mount", f"type=bind,src={host},dst={ctr},options={opts}"]
        for e in self.config.env:
            args += ["--env", e]
        return args

    def _argv_in_container(self, port: int) -> list[str]:
        try:
            argv = shlex.split(self.replica_cmd.replace("{port}", str(port)))
        except ValueError as exc:
            raise ActuatorError(f"replica_cmd: {exc}") from None
        if not argv:
            raise ActuatorError("replica_cmd is empty")
        return argv

    async def _ensure_pulled(self) -> None:
        async with self._pull_lock:  # one pull; the others wait for it
            if not self._swept:
                self._swept = True
                await self._sweep_stale()
            if self._pulled:
                return
            t = trio.current_time()
            if self.config.pull_cmd:
                argv = ["/bin/sh", "-c", self.config.pull_cmd
                        .replace("{image}", shlex.quote(self.config.image))
                        .replace("{address}", shlex.quote(self.config.address))]
            else:
                argv = [sys.executable, "-m", "snapshotter.cli", "pull", self.config.image,
                        "--containerd-socket", self.config.address,
                        "--timeout", str(self.config.pull_timeout_s)]
            await self._run(argv, what=f"pull of {self.config.image}",
                            timeout=self.config.pull_timeout_s)
            self.pull_s = trio.current_time() - t
            self._pulled = True
            log.info("pulled %s in %.2fs", self.config.image, self.pull_s)

    async def _sweep_stale(self) -> None:
        """Remove containers of our prefix left by a proxy that is gone."""
        r = await self._ctr("containers", "ls", "-q", what="container list", check=False)
        for cid in r.stdout.decode(errors="replace").split():
            rest = cid.removeprefix(f"{self.config.id_prefix}-")
            if rest == cid or "-" not in rest:
                continue
            pid = rest.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                log.warning("removing container %s left by a proxy that is gone (pid %s)", cid, pid)
                await self._remove(cid)

    async def _remove(self, cid: str) -> None:
        """Delete the task (--force kills it first) until containerd has none, then the
        container; bounded by ctr_timeout_s."""
        deadline = trio.current_time() + self.config.ctr_timeout_s
        while True:
            r = await self._ctr("tasks", "delete", "--force", cid, what="task delete", check=False)
            if b"not found" in r.stderr:
                break
            if trio.current_time() > deadline:
                log.warning("could not delete the task of %s: %s", cid, _last_line(r.stderr))
                break
            await trio.sleep(0.1)  # deleted, or not deletable yet: look again
        r = await self._ctr("containers", "delete", cid, what="container delete", check=False)
        if r.returncode != 0 and b"not found" not in r.stderr:
            log.warning("could not delete container %s: %s", cid, _last_line(r.stderr))

    async def _ctr(self, *args: str, what: str, check: bool = True
                   ) -> subprocess.CompletedProcess:
        return await self._run([*self._ctr_base(), *args], what=what, check=check,
                               timeout=self.config.ctr_timeout_s)

    async def _run(self, argv: list[str], *, what: str, timeout: float, check: bool = True
                   ) -> subprocess.CompletedProcess:
        try:
            with trio.fail_after(timeout):
                r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                           stdin=subprocess.DEVNULL, check=False)
        except trio.TooSlowError:
            raise ActuatorError(f"{what} took over {timeout:g}s") from None
        except OSError as exc:
            raise ActuatorError(f"{what}: cannot run {argv[0]}: {exc}") from None
        if check and r.returncode != 0:
            raise ActuatorError(f"{what} failed (exit {r.returncode}): "
                                f"{_last_line(r.stderr) or _last_line(r.stdout)}")
        return r


def _last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
