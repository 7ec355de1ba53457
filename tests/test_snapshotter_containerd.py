"""The snapshotter under a real containerd (Debian's 1.6) as its `p2pfs` proxy plugin, with
images from a local registry: containerd's own download and unpack into our mounts, a
container run from them, a snapshotter restarted mid-life, garbage collection after the
image is removed, and a CRI pull whose layers are all served from a layers directory (a
plain directory standing in for the p2pfs mount) without downloading them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from containerd_helpers import ContainerdError, containerd_factory, needs_containerd  # noqa: F401
from image_helpers import MT_OCI_MANIFEST, busybox_image, push, registry  # noqa: F401
from snapshotter._cri import ImageService
from snapshotter._erofs import detach_all

pytestmark = needs_containerd
REPO = Path(__file__).resolve().parent.parent


class SnapshotterProcess:
    """`p2pfs-snapshotter serve` as its own process (started, stopped, restarted by PID)."""

    def __init__(self, tmp: Path, layers_mount: Path | None = None) -> None:
        self.root, self.layers_mount = tmp / "snap-root", layers_mount
        self.short = Path(os.path.realpath(tmp))  # the socket path must stay short
        self.socket = Path(f"/tmp/p2pfs-snap-{os.getpid()}-{id(self):x}.sock")
        self.log = tmp / "snapshotter.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SnapshotterProcess":
        argv = [sys.executable, "-m", "snapshotter.cli", "serve", "--socket", str(self.socket),
                "--root", str(self.root), "--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        if self.layers_mount:
            argv += ["--layers-mount", str(self.layers_mount)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 30
        while not self.socket.is_socket():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "snapshotter did not listen"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.socket.is_socket():
            self.socket.unlink()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def snapshot_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.root / "snapshots").iterdir())


@pytest.fixture
def snapshotter_factory(tmp_path):
    started: list[SnapshotterProcess] = []

    def make(**kwargs) -> SnapshotterProcess:
        sp = SnapshotterProcess(tmp_path, **kwargs)
        started.append(sp)
        return sp.start()

    yield make
    for sp in started:
        sp.stop()
        detach_all(sp.root)  # the layers' EROFS mounts outlive a snapshotter on purpose


def _snapshots(node, namespace: str = "k8s.io") -> list[tuple[str, str, str]]:
    """`ctr snapshots ls`: (key, parent, kind) rows."""
    out = node.ctr("snapshots", "--snapshotter", "p2pfs", "ls", namespace=namespace).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return sorted((w[0], w[1] if len(w) == 3 else "", w[-1]) for w in rows)


def test_pull_run_restart_and_gc(tmp_path, registry, containerd_factory, snapshotter_factory):  # noqa: F811
    image = busybox_image(tmp_path / "img")
    push(image.oci_dir, image.tag, registry, "test/busybox")
    ref = f"{registry.host}/test/busybox:{image.tag}"
    sn = snapshotter_factory()
    node = containerd_factory(snapshotter="p2pfs", proxy_socket=sn.socket, registries=[registry.host])
    assert "p2pfs" in node.ctr("plugins", "ls").stdout

    node.ctr("images", "pull", "--plain-http", "--snapshotter", "p2pfs", ref, namespace="default")
    layers = _snapshots(node, "default")
    assert len(layers) == 3 and all(kind == "Committed" for _, _, kind in layers)
    assert sn.metric("p2pfs_snapshotter_layers_total", served="local") == 3  # ctr sends no labels
    run = node.run_container(ref, "snap-run-1", ["sh", "-c", "echo hi; cat /etc/app/c.conf; ls /etc/app; "
                                                 "test -e /etc/hello.txt || echo gone"],
                             namespace="default")
    assert run.output.split() == ["hi", "c=3", "c.conf", "gone"]

    # restarted mid-life, with a container running on one of its snapshots
    pid = node.start_container(ref, "snap-long", ["sleep", "600"], namespace="default")
    before = _snapshots(node, "default")
    sn.stop()
    assert node.ctr("snapshots", "--snapshotter", "p2pfs", "ls", namespace="default",
                    check=False).returncode != 0  # containerd answers unavailable meanwhile
    sn.start()
    # containerd redials with gRPC backoff capped at 3 s (services/server: MaxDelay)
    deadline = time.monotonic() + 10
    while node.ctr("snapshots", "--snapshotter", "p2pfs", "ls", namespace="default",
                   check=False).returncode != 0:
        assert time.monotonic() < deadline, "containerd did not reconnect"
        time.sleep(0.2)
    assert _snapshots(node, "default") == before
    os.kill(pid, 0)  # still running
    assert node.run_container(ref, "snap-run-2", ["echo", "again"], namespace="default").output == "again\n"
    node.ctr("tasks", "kill", "-s", "SIGKILL", "snap-long", namespace="default")
    deadline = time.monotonic() + 20
    while node.ctr("tasks", "rm", "-f", "snap-long", namespace="default", check=False).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    node.ctr("containers", "rm", "snap-long", namespace="default")

    # removing the image: containerd Removes every snapshot and calls Cleanup
    assert len(sn.snapshot_dirs()) >= 3  # the layers (and a removed container's, until GC)
    node.ctr("images", "rm", "--sync", ref, namespace="default")
    deadline = time.monotonic() + 30
    while sn.snapshot_dirs() or _snapshots(node, "default"):
        assert time.monotonic() < deadline, (sn.snapshot_dirs(), _snapshots(node, "default"))
        time.sleep(0.2)
    assert list((sn.root / "trash").iterdir()) == []


def _stand_in_layer(src: Path, dest: Path) -> None:
    """A layer tree as a p2pfs mount shows it: the OCI whiteouts as overlayfs wants them."""
    subprocess.run(["cp", "-a", f"{src}/.", str(dest)], check=True)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in filenames:
            if name == ".wh..wh..opq":
                os.unlink(os.path.join(dirpath, name))
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            elif name.startswith(".wh."):
                os.unlink(os.path.join(dirpath, name))
                os.mknod(os.path.join(dirpath, name[4:]), 0o600 | 0o020000, os.makedev(0, 0))


def test_cri_pull_serves_converted_layers_remotely(tmp_path, registry, containerd_factory,  # noqa: F811
                                                   snapshotter_factory):
    image = busybox_image(tmp_path / "img")
    push(image.oci_dir, image.tag, registry, "test/remote")
    ref = f"{registry.host}/test/remote:{image.tag}"
    _, _, body = registry.get(f"/v2/test/remote/manifests/{image.tag}", accept=MT_OCI_MANIFEST)
    digests = [layer["digest"] for layer in json.loads(body)["layers"]]
    layers = tmp_path / "layers"
    for digest, src in zip(digests, image.layer_dirs):
        (layers / digest.split(":")[1]).mkdir(parents=True)
        _stand_in_layer(src, layers / digest.split(":")[1])

    sn = snapshotter_factory(layers_mount=layers)
    node = containerd_factory(snapshotter="p2pfs", proxy_socket=sn.socket, registries=[registry.host])
    r = subprocess.run([sys.executable, "-m", "snapshotter.cli", "pull", ref, "--containerd-socket",
                        str(node.socket), "--json"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    pulled = json.loads(r.stdout)
    assert pulled["ref"] == ref and pulled["image_ref"].startswith("sha256:")
    assert sn.metric("p2pfs_snapshotter_layers_total", served="remote") == 3
    assert sn.metric("p2pfs_snapshotter_layers_total", served="local") == 0
    names = [key for key, _, _ in _snapshots(node)]
    assert len(names) == 3 and all(n.startswith("sha256:") for n in names)
    # containerd downloaded no layer blob: its content store holds the manifest and config only
    stored = {line.split()[0] for line in node.ctr("content", "ls").stdout.splitlines()[1:]}
    assert len(stored) == 2 and not stored & set(digests)
    run = node.run_container(ref, "snap-remote-1", [
        "sh", "-c", "echo hi; cat /etc/app/c.conf; ls /etc/app; test -e /etc/hello.txt || echo gone; "
        "cat /data/note.txt; readlink /etc/motd"])
    assert run.output.split() == ["hi", "c=3", "c.conf", "gone", "note", "v2", "hello.txt"]
    # the container's writes land in its own upper dir, never in the layers
    node.run_container(ref, "snap-remote-2", ["sh", "-c", "echo x > /etc/new; rm /data/note.txt"])
    assert not any((layers / d.split(":")[1] / "etc" / "new").exists() for d in digests)
    assert (layers / digests[2].split(":")[1] / "data" / "note.txt").exists()
    # a remote layer that does not answer: the container is refused with UNAVAILABLE at once
    base_dir = layers / digests[0].split(":")[1]
    base_dir.rename(layers / "gone")
    t0 = time.monotonic()
    with pytest.raises(ContainerdError) as refused:
        node.run_container(ref, "snap-remote-3", ["echo", "never"])
    assert "unavailable" in str(refused.value).lower() and time.monotonic() - t0 < 30
    (layers / "gone").rename(base_dir)
    assert node.run_container(ref, "snap-remote-4", ["echo", "back"]).output == "back\n"

    # removing the image through CRI: containerd's GC removes the remote snapshots too; the
    # layers themselves belong to the p2pfs mount and stay
    with ImageService(str(node.socket), timeout=120) as cri:
        cri.remove(ref)
    deadline = time.monotonic() + 30
    while sn.snapshot_dirs() or _snapshots(node):
        assert time.monotonic() < deadline, (sn.snapshot_dirs(), _snapshots(node))
        time.sleep(0.2)
    assert all((layers / d.split(":")[1] / "bin").is_dir() for d in digests[:1])
