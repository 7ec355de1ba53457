"""A real containerd (Debian's 1.6) for tests and benchmarks, started as a process with its own
config, root, state and socket, and always torn down.

The shims still keep sockets and fifos under the shared /run/containerd/{s,fifo} (named from
this instance's socket address, or at random); runc's state goes to this instance's own
`--runc-root` and each container gets a cgroup named after the instance, so container ids may
repeat across instances (two "nodes" running the same container id). Both clean up after a task that
is killed and deleted, so `stop()` kills and deletes every task and container this containerd
created (and only those: it asks its own socket) before it stops the daemon by PID. Socket paths must stay under 108 bytes (sun_path), and containerd derives
longer ones from them, so the socket and state live in a short /tmp/p2pfs-ctd-XXXX directory
while the (possibly large) root may live anywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
HAVE_CONTAINERD = (os.geteuid() == 0 and os.path.exists(CONTAINERD) and os.path.exists(CTR)
                   and shutil.which("runc") is not None)
needs_containerd = pytest.mark.skipif(
    not HAVE_CONTAINERD, reason="needs root, containerd, ctr and runc (Debian packages)")

CRI_NAMESPACE = "k8s.io"


class ContainerdError(RuntimeError):
    """containerd did not start, or a `ctr` command failed (the message holds its output)."""


@dataclass(frozen=True)
class RunResult:
    """One `ctr run`: its output, exit status, and monotonic stamps of its start and of the
    first byte it wrote to stdout (None when it wrote nothing)."""

    output: str
    returncode: int
    started: float
    first_output: float | None
    ended: float

    @property
    def time_to_first_output(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.started


def config_text(*, root: Path, state: Path, socket: Path, snapshotter: str,
                proxy_socket: Path | None, registry_dir: Path, cni_dir: Path) -> str:
    """containerd 1.6's config (version 2) for one isolated instance."""
    proxy = ""
    if proxy_socket is not None:
        proxy = f'\n[proxy_plugins.p2pfs]\n  type = "snapshot"\n  address = "{proxy_socket}"\n'
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root}"
state = "{state}"
# Plugins that would only log noise here (no btrfs/zfs/devmapper/aufs, no tracing).
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""
{proxy}
[{cri}]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  enable_tls_streaming = false

[{cri}.containerd]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false

[{cri}.cni]
  conf_dir = "{cni_dir}"

[{cri}.registry]
  config_path = "{registry_dir}"
"""


def hosts_toml(upstream: str, *, fallback: str | None = None) -> str:
    """A registry's hosts.toml (plain HTTP): containerd tries each `[host]` in order, then
    `server`; with `fallback` the registry is the `[host]` and the mirror the `server`."""
    host = (f'[host."http://{upstream}"]\n  capabilities = ["pull", "resolve"]\n'
            f'  skip_verify = true\n')
    return f'server = "http://{fallback or upstream}"\n\n{host}'


class Containerd:
    """One containerd process. `registries` are "host:port" of plain-HTTP registries (the
    test registry): each gets a hosts.toml so CRI pulls from it over http; a mapping
    {"host:port" in image refs: "host:port" to connect to} sends pulls through another
    address (a counting relay in front of the registry). `mirrors` {"host:port" in image refs:
    "host:port" of an image metadata mirror} makes that mirror the registry's fallback: the
    hosts.toml's `server`, tried after the `[host]` (the registry itself) fails."""

    def __init__(self, root: Path, *, snapshotter: str = "p2pfs", proxy_socket: Path | None = None,
                 registries: Sequence[str] | Mapping[str, str] = (), start_timeout: float = 30.0,
                 mirrors: Mapping[str, str] | None = None):
        self.root = Path(root)
        self.snapshotter = snapshotter
        self.proxy_socket = proxy_socket
        self.registries = (dict(registries) if isinstance(registries, Mapping)
                           else {host: host for host in registries})
        self.start_timeout = start_timeout
        self.mirrors = dict(mirrors or {})
        self.short = Path(tempfile.mkdtemp(prefix="p2pfs-ctd-", dir="/tmp"))
        self.socket = self.short / "c.sock"
        self.state = self.short / "state"
        self.config = self.short / "config.toml"
        self.registry_dir = self.short / "certs.d"
        self.cni_dir = self.short / "cni"
        self.runc_root = self.short / "runc"  # not the shared /run/containerd/runc: ids may repeat across instances
        self.log = self.root.parent / f"{self.root.name}-containerd.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle -------------------------------------------------------------------------

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.state, self.registry_dir, self.cni_dir):
            d.mkdir(parents=True, exist_ok=True)
        for host, server in self.registries.items():
            (self.registry_dir / host).mkdir(exist_ok=True)
            (self.registry_dir / host / "hosts.toml").write_text(
                hosts_toml(server, fallback=self.mirrors.get(host)))
        self.config.write_text(config_text(
            root=self.root, state=self.state, socket=self.socket, snapshotter=self.snapshotter,
            proxy_socket=self.proxy_socket, registry_dir=self.registry_dir, cni_dir=self.cni_dir))

    def start(self) -> "Containerd":
        self.write_config()
        self._log_file = open(self.log, "ab")
        self.proc = subprocess.Popen([CONTAINERD, "--config", str(self.config), "--log-level", "info"],
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.socket.exists():
                r = subprocess.run([CTR, "--address", str(self.socket), "version"],
                                   capture_output=True, text=True, timeout=10)
                if r.returncode == 0 and "Server:" in r.stdout:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ContainerdError(f"containerd not ready in {self.start_timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill and delete this instance's tasks and containers, stop containerd by PID,
        unmount anything left under its dirs, and remove the short dir (root is the caller's)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._remove_workloads()
            finally:
                self._stop_process()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _unmount_under(self.short)
        _unmount_under(self.root)
        shutil.rmtree(self.short, ignore_errors=True)

    def _remove_workloads(self) -> None:
        for ns in self.namespaces():
            for task in self._ids(ns, "tasks"):
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
            for task in self._ids(ns, "tasks"):
                self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False, timeout=30)
            for cid in self._ids(ns, "containers"):
                self.ctr("containers", "rm", cid, namespace=ns, check=False)

    def _ids(self, ns: str, kind: str) -> list[str]:
        r = self.ctr(kind, "ls", "-q", namespace=ns, check=False)
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []

    def _stop_process(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- ctr -------------------------------------------------------------------------------

    def ctr(self, *args: str, namespace: str = CRI_NAMESPACE, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([CTR, "--address", str(self.socket), "-n", namespace, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def wait_proxy_snapshotter(self, name: str = "p2pfs", timeout: float = 30.0) -> float:
        """Seconds until this containerd's connection to its proxy snapshotter `name` serves
        a call; raises ContainerdError after `timeout`. `ctr snapshots ls` is answered from
        containerd's own metadata even when the snapshotter is unreachable, so the probe
        prepares a snapshot (forwarded to the snapshotter) and removes it. A dial that
        failed leaves the connection in gRPC's backoff (up to ~3 s), failing calls at once."""
        key = f"p2pfs-connected-probe-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        while True:
            r = self.ctr("snapshots", "--snapshotter", name, "prepare", key, check=False)
            if r.returncode == 0 or "already exists" in r.stderr:
                self.ctr("snapshots", "--snapshotter", name, "rm", key)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise ContainerdError(f"containerd did not reach snapshotter {name} in {timeout}s: "
                                      f"{r.stderr.strip()}")
            time.sleep(0.1)

    def namespaces(self) -> list[str]:
        r = self.ctr("namespaces", "ls", "-q", check=False)
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]

    def images(self, namespace: str = CRI_NAMESPACE) -> list[str]:
        r = self.ctr("images", "ls", "-q", namespace=namespace)
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]

    def run_container(self, ref: str, container_id: str, cmd: Sequence[str], *,
                      snapshotter: str | None = None, namespace: str = CRI_NAMESPACE,
                      timeout: float = 300,
                      on_first_output: Callable[[], object] | None = None,
                      mounts: Sequence[tuple[str | os.PathLike, str]] = (),
                      net_host: bool = False) -> RunResult:
        """`ctr run --rm` REF as CONTAINER_ID running CMD; stdout is read as it streams so the
        first byte's time is the container's first output, not its exit. `on_first_output`
        is called the moment that byte arrives (a benchmark reads its byte counters there).
        `mounts`: (host path, container path) pairs bound in read-only; `net_host`: the
        host's network namespace."""
        argv = [CTR, "--address", str(self.socket), "-n", namespace, "run", "--rm",
                *self._isolation(container_id), *_run_options(mounts, net_host),
                "--snapshotter", snapshotter or self.snapshotter, ref, container_id, *cmd]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first: float | None = None
        chunks: list[bytes] = []
        assert proc.stdout is not None
        try:
            fd = proc.stdout.fileno()
            while True:
                _wait_readable(fd, started + timeout)
                data = os.read(fd, 65536)
                if not data:
                    break
                if first is None:
                    first = time.monotonic()
                    if on_first_output is not None:
                        on_first_output()
                chunks.append(data)
            proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        ended = time.monotonic()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        out = b"".join(chunks).decode(errors="replace")
        if proc.returncode != 0:
            raise ContainerdError(f"ctr run {ref} failed ({proc.returncode}):\n{out}\n{err}")
        return RunResult(output=out, returncode=proc.returncode, started=started,
                         first_output=first, ended=ended)

    def _isolation(self, container_id: str) -> list[str]:
        """ctr run's defaults are shared by every containerd on the host: runc state in
        /run/containerd/runc/<ns>/<id> and the cgroup /<ns>/<id> (whose delete kills every
        process in it). Give this instance's containers their own."""
        return ["--runc-root", str(self.runc_root), "--cgroup", f"/{self.short.name}-{container_id}"]

    def start_container(self, ref: str, container_id: str, cmd: Sequence[str], *,
                        snapshotter: str | None = None, namespace: str = CRI_NAMESPACE,
                        mounts: Sequence[tuple[str | os.PathLike, str]] = (),
                        net_host: bool = False, log_path: Path | None = None) -> int:
        """`ctr run -d`: start CMD in the background; returns the task's host PID (stop()
        kills it, or `ctr("tasks", "kill", ...)`). `mounts` and `net_host` as in
        run_container; `log_path`: a file that receives the task's stdout and stderr."""
        log = ["--log-uri", f"file://{log_path}"] if log_path is not None else []
        self.ctr("run", "-d", *self._isolation(container_id), *_run_options(mounts, net_host), *log,
                 "--snapshotter", snapshotter or self.snapshotter, ref, container_id, *cmd,
                 namespace=namespace)
        for line in self.ctr("tasks", "ls", namespace=namespace).stdout.splitlines()[1:]:
            words = line.split()
            if words and words[0] == container_id:
                return int(words[1])
        raise ContainerdError(f"task {container_id} not listed after ctr run -d")


def _run_options(mounts: Sequence[tuple[str | os.PathLike, str]], net_host: bool) -> list[str]:
    opts = [f"--mount=type=bind,src={host},dst={ctr},options=rbind:ro" for host, ctr in mounts]
    return opts + (["--net-host"] if net_host else [])


def _wait_readable(fd: int, deadline: float) -> None:
    import select

    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise TimeoutError("ctr run produced no output in time")


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted below PATH (deepest first)."""
    prefix = str(Path(path).resolve()) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [m.split()[1].encode().decode("unicode_escape") for m in mounts]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)


@pytest.fixture
def containerd_factory(tmp_path: Path) -> Iterator[Callable[..., Containerd]]:
    """Start containerds (`factory(snapshotter=..., proxy_socket=..., registries=[...])`);
    every one is stopped when the test ends."""
    if not HAVE_CONTAINERD:
        pytest.skip("needs root, containerd, ctr and runc (Debian packages)")
    started: list[Containerd] = []

    def factory(**kwargs: object) -> Containerd:
        node = Containerd(tmp_path / f"containerd{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(node)
        return node.start()

    try:
        yield factory
    finally:
        for node in reversed(started):
            node.stop()


@pytest.fixture
def busybox_ref(tmp_path: Path, registry) -> str:
    """tests/image_helpers' three-layer busybox image pushed to the `registry` fixture (import
    both fixtures into the test module); its reference."""
    from image_helpers import busybox_image, push

    image = busybox_image(tmp_path / "busybox-image")
    push(image.oci_dir, image.tag, registry, "test/busybox")
    return f"{registry.host}/test/busybox:{image.tag}"
