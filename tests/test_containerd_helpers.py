"""tests/containerd_helpers.py itself: an instance cleans up only what it started."""

from __future__ import annotations

import os
from pathlib import Path

from containerd_helpers import busybox_ref, containerd_factory, needs_containerd  # noqa: F401
from image_helpers import registry  # noqa: F401


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


@needs_containerd
def test_stop_kills_its_own_tasks_and_no_others(registry, containerd_factory, busybox_ref):  # noqa: F811
    ref = busybox_ref
    one = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    two = containerd_factory(snapshotter="overlayfs", registries=[registry.host])
    for node in (one, two):
        node.ctr("images", "pull", "--plain-http", ref)
    # The same container id in both: with ctr's defaults (runc root /run/containerd/runc/<ns>/<id>,
    # cgroup /<ns>/<id>) they would share state and a cgroup, and deleting one kills both.
    pid_one = one.start_container(ref, "sleeper", ["sleep", "1000"])
    pid_two = two.start_container(ref, "sleeper", ["sleep", "1000"])
    assert _alive(pid_one) and _alive(pid_two)
    assert len(str(one.socket)) < 100  # sun_path and the .ttrpc sibling stay within bounds

    one.stop()
    assert not _alive(pid_one)
    assert not os.path.exists("/run/containerd/runc/k8s.io/sleeper")
    assert not one.short.exists() and one.proc.poll() is not None
    assert _alive(pid_two)
    assert two.ctr("tasks", "ls", "-q").stdout.split() == ["sleeper"]

    run = two.run_container(ref, "echo-1", ["echo", "still here"])
    assert run.output == "still here\n" and run.first_output is not None
    assert (two.runc_root / "k8s.io" / "sleeper").is_dir()
    two.stop()
    assert not _alive(pid_two)
