"""One "node" for image tests and the image benchmark: a p2pfs mount of the layers prefix
(its own daemon and cache), a p2pfs-snapshotter process over it, and a containerd whose
proxy plugin `p2pfs` is that snapshotter. Every part has its own temp dirs and is stopped
by PID; `ImageNode.stop()` tears down in the order that leaves nothing mounted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from conftest import p2pfs_cmd
from containerd_helpers import ContainerdError
from peer_helpers import free_port
from snapshotter._erofs import detach_all

SNAPSHOTTER = [sys.executable, "-m", "snapshotter.cli"]
#: Every snapshotter process started; conftest's autouse fixture stops what a test left.
STARTED: list["Snapshotter"] = []


def wait_for_socket(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if proc.poll() is not None:
            raise RuntimeError(f"snapshotter exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"snapshotter socket {path} did not appear:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


class Snapshotter:
    """A `p2pfs-snapshotter serve` process."""

    def __init__(self, root: Path, *, layers_mount: Path | None, layers_url: str | None,
                 endpoint: str, containerd_root: Path | None = None,
                 plain_http: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                 status: bool = False) -> None:
        self.root = root
        self.short = Path(tempfile.mkdtemp(prefix="p2pfs-sn-", dir="/tmp"))
        self.socket = self.short / "s.sock"
        self.log = root.parent / f"{root.name}-snapshotter.log"
        self.args = ["serve", "--socket", str(self.socket), "--root", str(root)]
        if layers_mount:
            self.args += ["--layers-mount", str(layers_mount)]
        if layers_url:
            self.args += ["--layers", layers_url]
        if containerd_root:
            self.args += ["--containerd-root", str(containerd_root)]
        for host in plain_http:
            self.args += ["--plain-http", host]
        self.args += list(extra)
        #: With `status`: the HOST:PORT of `serve --metrics-addr` (its /status), else None.
        self.metrics_addr = f"127.0.0.1:{free_port(['127.0.0.1'])}" if status else None
        if self.metrics_addr:
            self.args += ["--metrics-addr", self.metrics_addr]
        self.env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Snapshotter":
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([*SNAPSHOTTER, *self.args], env=self.env,
                                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        STARTED.append(self)
        wait_for_socket(self.socket, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM, *, keep_dir: bool = False) -> None:
        """Stop the process (by PID); remove its socket dir unless it is to start again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not keep_dir:
            shutil.rmtree(self.short, ignore_errors=True)
            detach_all(self.root)  # the layers' EROFS mounts outlive a snapshotter on purpose

    def restart(self) -> None:
        self.stop(keep_dir=True)
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_store_open(self, timeout: float = 30.0) -> float:
        """Seconds until the snapshotter (made with `status=True`) reports its object store
        open (it opens in the background after the socket is up). Raises on failure or
        timeout."""
        import urllib.request

        assert self.metrics_addr, "wait_store_open needs Snapshotter(..., status=True)"
        metrics_addr = self.metrics_addr
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://{metrics_addr}/status", timeout=5) as resp:
                    state = json.loads(resp.read()).get("object_store")
            except OSError:
                state = "opening"  # the endpoint starts a moment after the socket
            if state == "open":
                return time.monotonic() - t0
            if state is None or state.startswith("failed") or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"snapshotter object store: {state}\n" + self.log_text()[-2000:])
            time.sleep(0.02)


class ImageNode:
    """Mount + snapshotter + containerd. `mount_factory` and `containerd_factory` are the
    fixtures' factories, so their teardown also runs if this node's stop is not reached."""

    def __init__(self, name: str, tmp: Path, *, layers_url: str, endpoint: str, registry_host: str,
                 mount_factory, containerd_factory, mount_args: tuple[str, ...] = (),
                 registries: Any = None, snapshotter_args: tuple[str, ...] = (),
                 mirrors: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.layers_url = layers_url
        mp = self.dir / "layers"
        mp.mkdir()
        self.mount = mount_factory(layers_url, endpoint, "--allow-empty", *mount_args,
                                   cache_dir=self.dir / "cache", mountpoint=mp)
        self.snapshotter = Snapshotter(self.dir / "snap", layers_mount=mp, layers_url=layers_url,
                                       endpoint=endpoint, plain_http=(registry_host,),
                                       extra=snapshotter_args)
        # containerd dials its proxy plugin lazily: start it first, then the snapshotter
        # with containerd's root (its content store is where first pulls are converted from).
        self.containerd = containerd_factory(proxy_socket=self.snapshotter.socket,
                                             registries=registries or [registry_host],
                                             mirrors=mirrors)
        self.snapshotter.args += ["--containerd-root", str(self.containerd.root)]
        self.snapshotter.start()
        self.wait_connected()

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Until containerd reaches the snapshotter with a call (raises otherwise)."""
        try:
            self.containerd.wait_proxy_snapshotter("p2pfs", timeout)
        except ContainerdError as exc:
            raise ContainerdError(f"{exc}\n{self.snapshotter.log_text()[-2000:]}") from None

    def pull(self, ref: str, timeout: float = 300) -> dict:
        r = subprocess.run([*SNAPSHOTTER, "pull", ref, "--containerd-socket",
                            str(self.containerd.socket), "--json"],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"pull {ref} failed: {r.stderr}\n{self.snapshotter.log_text()[-3000:]}")
        return json.loads(r.stdout)

    def status(self) -> dict:
        return self.mount.status()

    def origin_bytes(self) -> int:
        return int(self.status().get("bytes_by_source", {}).get("origin", 0))

    def stop(self) -> None:
        self.containerd.stop()
        self.snapshotter.stop()
        self.mount.stop()


def refresh(node: ImageNode) -> dict:
    return json.loads(p2pfs_cmd("refresh", str(node.mount.path), "--json").stdout)


def first_pull_converted(name: str, tmp: Path, layer_digests: list[str], ref: str,
                         **kw: Any) -> ImageNode:
    """A node that pulled `ref` normally, once its layers are converted in the background
    and attached to its mount."""
    from conftest import wait_for

    node = ImageNode(name, tmp, **kw)
    node.pull(ref)
    dirs = [node.mount.path / d.removeprefix("sha256:") for d in layer_digests]
    wait_for(lambda: all(d.is_dir() for d in dirs) or (refresh(node) and False), timeout=90,
             what="layers converted and attached")
    return node
