"""The containerd actuator against a real containerd (Debian's), runc and a real registry:
replicas are containers (busybox httpd serving a bind-mounted directory), scaled up by a
burst through the real proxy, timed stage by stage, and removed at scale-down; a pull
that cannot succeed fails the start with its reason; containers a dead proxy left are
swept. (The p2pfs snapshotter and the MiniLM replica: tests/test_coldstart_e2e.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

from scaler import (ConcurrencyPolicy, LocalActuator, LocalConfig, PolicyConfig, ProxyConfig,
                    run_proxy)
from scaler import _http
from scaler._config import ContainerdConfig
from scaler._containerd import ContainerdRunner

from containerd_helpers import busybox_ref, containerd_factory, needs_containerd  # noqa: F401
from image_helpers import registry  # noqa: F401

CMD = "/bin/busybox httpd -f -p 127.0.0.1:{port} -h /www"
POLICY = PolicyConfig(target_concurrency=2, stable_window_s=3, panic_window_s=1, tick_s=0.25,
                      sample_s=0.25, scale_to_zero_grace_s=1.5, min_replicas=0, max_replicas=3)
PROXY = ProxyConfig(port=0, max_concurrency=2, queue_timeout_s=60, max_queue=500)
PREFIX = "t-scaler"


def _local(cmd: str = CMD) -> LocalConfig:
    # busybox httpd as PID 1 ignores SIGTERM: the SIGKILL after stop_timeout_s ends it.
    return LocalConfig(replica_cmd=cmd, probe_interval_s=0.05, stop_timeout_s=2,
                       drain_timeout_s=5, start_timeout_s=120)


def _ours(ctd) -> list[str]:
    return [c for c in ctd.ctr("containers", "ls", "-q").stdout.split() if c.startswith(PREFIX)]


@pytest.fixture
def www(tmp_path):
    d = tmp_path / "www"
    d.mkdir()
    (d / "healthz").write_text("ok\n")
    (d / "hello").write_text("hello from a container\n")
    return d


async def _get_all(port: int, n: int, clients: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    jobs = iter(range(n))

    async def client() -> None:
        for _ in jobs:
            r = await _http.get("127.0.0.1", port, "/hello", timeout=60)
            out.append((r.status, r.body))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return out


@needs_containerd
async def test_containers_scale_with_a_burst_report_stages_and_are_removed(
        tmp_path, www, containerd_factory, busybox_ref, registry):  # noqa: F811
    ctd = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    cfg = ContainerdConfig(image=busybox_ref, snapshotter="overlayfs", address=str(ctd.socket),
                           mounts=(f"{www}:/www",), id_prefix=PREFIX)
    act = LocalActuator(_local(), ContainerdRunner(cfg, CMD))
    async with trio.open_nursery() as nursery:
        run = await nursery.start(run_proxy, PROXY, ConcurrencyPolicy(POLICY), act)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(_ours(ctd)) if act.fleet().ready else 0, act.fleet().ready)
                await trio.sleep(0.1)

        nursery.start_soon(watch)
        with trio.fail_after(120):
            answers = await _get_all(run.port, n=150, clients=12)
        assert answers == [(200, b"hello from a container\n")] * 150
        assert peak >= 2, f"did not scale up (peak {peak})"
        doc = json.loads((await _http.get("127.0.0.1", run.port, "/-/status", timeout=5)).body)
        cold = [s for s in doc["starts"] if s["kind"] == "cold" and s["state"] == "answered"]
        assert cold, doc["starts"]
        first = cold[0]["stages"]
        assert first["image"] > 0 and first["server_init"] >= 0 and first["first_answer"] >= 0
        assert first["weights"] is None  # busybox reports no load time
        with trio.fail_after(60):  # back to zero: every container and task removed
            while act.fleet().serving or act.pids() or await trio.to_thread.run_sync(_ours, ctd):
                await trio.sleep(0.2)
        s = run.dispatcher.statistics()
        assert (s.served, s.rejected_full, s.rejected_timeout, s.failed) == (150, 0, 0, 0)
        nursery.cancel_scope.cancel()
    tasks = ctd.ctr("tasks", "ls", "-q").stdout.split()
    assert not [t for t in tasks if t.startswith(PREFIX)]


@needs_containerd
async def test_a_pull_that_fails_fails_the_start_with_its_reason(
        tmp_path, www, containerd_factory, registry):  # noqa: F811
    ctd = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    cfg = ContainerdConfig(image=f"{registry.host}/no/such:image", snapshotter="overlayfs",
                           address=str(ctd.socket), mounts=(f"{www}:/www",), id_prefix=PREFIX,
                           pull_timeout_s=60)
    act = LocalActuator(_local(), ContainerdRunner(cfg, CMD))
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, _NoHooks())
        act.set_target(1, 0)
        with trio.fail_after(90):
            while not act.start_records() or act.start_records()[0].failed is None:
                await trio.sleep(0.1)
        err = act.start_records()[0].failed
        assert "pull of" in err and "failed" in err
        act.set_target(0, 0)
        nursery.cancel_scope.cancel()
    assert not _ours(ctd)


@needs_containerd
async def test_containers_a_dead_proxy_left_are_swept(
        tmp_path, www, containerd_factory, busybox_ref, registry):  # noqa: F811
    ctd = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    subprocess.run([sys.executable, "-m", "snapshotter.cli", "pull", busybox_ref, "--containerd-socket",
                    str(ctd.socket)], check=True, capture_output=True, timeout=120)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no proxy has any more
    stale = f"{PREFIX}-{gone.pid}-replica-1"
    ctd.ctr("run", "-d", "--snapshotter", "overlayfs", busybox_ref, stale, "/bin/busybox", "sleep", "600")
    cfg = ContainerdConfig(image=busybox_ref, snapshotter="overlayfs", address=str(ctd.socket),
                           mounts=(f"{www}:/www",), id_prefix=PREFIX)
    act = LocalActuator(_local(), ContainerdRunner(cfg, CMD))
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, _NoHooks())
        act.set_target(1, 0)
        with trio.fail_after(90):
            while act.fleet().ready < 1:
                await trio.sleep(0.1)
        assert stale not in _ours(ctd) and len(_ours(ctd)) == 1
        nursery.cancel_scope.cancel()
    assert not _ours(ctd)


def test_bad_containerd_settings_are_refused():
    from scaler import ConfigError
    for bad in ({"mounts": ("models:/models",)}, {"mounts": ("/a:/b:rx",)}, {"env": ("NOVALUE",)},
                {"id_prefix": "a b"}, {"pull_timeout_s": 0}):
        with pytest.raises(ConfigError):
            ContainerdConfig(image="x", **bad)
    from scaler import ActuatorError
    with pytest.raises(ActuatorError):
        ContainerdRunner(ContainerdConfig(), CMD)  # no image


class _NoHooks:
    def ready(self, ep) -> None:
        return None

    async def drain(self, ep_id, timeout) -> None:
        return None

    def gone(self, ep_id) -> None:
        return None


def _shims(prefix: str) -> list[str]:
    """containerd-shim processes serving a container of ours (found, never killed, here)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "containerd-shim" in ln and f"-id {prefix}-" in ln]


@needs_containerd
async def test_a_replica_stopped_while_its_task_is_created_leaves_nothing(
        tmp_path, www, containerd_factory, busybox_ref, registry):  # noqa: F811
    # Before: SIGTERM went to `ctr tasks start` itself; arriving while ctr was still
    # creating the task, it killed ctr and containerd finished a task nobody deleted (a
    # shim and a `runc init` outlived the test). Now the signal goes to the task.
    prefix = "t-stopearly"
    ctd = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    cfg = ContainerdConfig(image=busybox_ref, snapshotter="overlayfs", address=str(ctd.socket),
                           mounts=(f"{www}:/www",), id_prefix=prefix)
    act = LocalActuator(_local(), ContainerdRunner(cfg, CMD))
    async with trio.open_nursery() as nursery:
        await nursery.start(act.run, _NoHooks())
        # ctr's task creation takes tens to hundreds of ms after it starts: stop at
        # several points of it.
        for delay in (0.0, 0.02, 0.05, 0.08, 0.12, 0.17, 0.25, 0.35):
            act.set_target(1, 0)
            with trio.fail_after(90):
                while not any(s.process_started for s in act.start_records()[-1:]):
                    await trio.sleep(0.002)
            await trio.sleep(delay)
            act.set_target(0, 0)
            with trio.fail_after(60):
                while act.pids():
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await trio.sleep(1.0)
    assert not [c for c in ctd.ctr("containers", "ls", "-q").stdout.split() if c.startswith(prefix)]
    assert not [t for t in ctd.ctr("tasks", "ls", "-q").stdout.split() if t.startswith(prefix)]
    assert not _shims(prefix)
