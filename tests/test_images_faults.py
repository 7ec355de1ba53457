"""End to end, faults: the snapshotter restarted under running containers, and the FUSE
daemon killed (new containers get UNAVAILABLE at once, nothing hangs). Real registry,
SeaweedFS, p2pfs mounts, p2pfs-snapshotter, containerd and runc."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from conftest import needs_fuse, p2pfs_cmd, wait_for
from containerd_helpers import HAVE_CONTAINERD, containerd_factory  # noqa: F401 - fixture
from image_helpers import registry  # noqa: F401 - fixture
from image_node import ImageNode, first_pull_converted
from test_images_e2e import image  # noqa: F401 - fixture

pytestmark = [needs_fuse, pytest.mark.skipif(not HAVE_CONTAINERD, reason="needs root, containerd and runc")]


def snapshot_keys(node: ImageNode) -> list[str]:
    out = node.containerd.ctr("snapshots", "--snapshotter", "p2pfs", "ls").stdout.splitlines()[1:]
    return sorted(line.split()[0] for line in out if line.strip())


def test_restart_keeps_containers_and_a_dead_fuse_daemon_means_unavailable(
        image, registry, seaweed, mount_factory, containerd_factory, tmp_path):  # noqa: F811
    url = f"s3://models/layers-{uuid.uuid4().hex[:6]}"
    kw = dict(layers_url=url, endpoint=seaweed.endpoint, registry_host=registry.host,
              mount_factory=mount_factory, containerd_factory=containerd_factory)
    node1 = first_pull_converted("node1", tmp_path, [l["digest"] for l in image["layers"]],
                                 image["ref"], **kw)
    node1.stop()

    node2 = ImageNode("node2", tmp_path, **kw)
    try:
        node2.pull(image["ref"])
        assert node2.snapshotter.log_text().count("served remotely") == len(image["layers"])
        pid = node2.containerd.start_container(image["ref"], "long", ["/bin/sleep", "600"])
        rootfs = Path(f"/proc/{pid}/root")
        assert (rootfs / "etc/app/c.conf").read_text() == "c=3\n"
        before = snapshot_keys(node2)

        # The snapshotter restarts: state from sqlite, the running container untouched.
        node2.snapshotter.restart()
        node2.wait_connected()  # containerd redials (at once: the socket's path went first)
        assert snapshot_keys(node2) == before
        assert (rootfs / "data/note.txt").read_text() == "note v2\n"
        out = node2.containerd.run_container(image["ref"], "after", ["/bin/cat", "/etc/app/c.conf"])
        assert out.output.strip() == "c=3"

        # The FUSE daemon dies: a new container is refused with UNAVAILABLE, quickly.
        os.kill(node2.mount.pid, signal.SIGKILL)
        wait_for(lambda: not node2.mount.alive(), timeout=10, what="daemon gone")
        t0 = time.monotonic()
        r = node2.containerd.ctr("run", "--rm", "--snapshotter", "p2pfs", image["ref"], "dead",
                                 "/bin/echo", "x", check=False)
        took = time.monotonic() - t0
        assert r.returncode != 0 and "unavailable" in (r.stderr + r.stdout).lower(), r.stderr
        assert took < 20, took
        assert "UNAVAILABLE" in node2.snapshotter.log_text()
    finally:
        node2.containerd.stop()
        node2.snapshotter.stop()
        p2pfs_cmd("unmount", "--lazy", str(node2.mount.path), check=False)
        node2.mount.stop()
