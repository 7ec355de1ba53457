"""ErofsLowers: when a remote layer is mounted as EROFS, when again, and when its FUSE dir
is used instead. The kernel mounts are replaced by recording fakes here (the real ones
are in tests/test_image_convert.py and the containerd tests)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from snapshotter._erofs import ErofsLowers

HEX = "ab" * 32


class FakeKernel:
    def __init__(self) -> None:
        self.mounted: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple] = []
        self.block = threading.Event()
        self.hang = False

    def mount(self, img: str, blob: str, target: str, read_ahead_kb: int = 0) -> None:
        if self.hang:
            self.block.wait(10)
        self.calls.append(("mount", img, blob, target))
        self.mounted[target] = (img, blob)

    def unmount(self, target: str) -> None:
        self.calls.append(("umount", target))
        self.mounted.pop(target, None)

    def is_mount(self, target: Path) -> bool:
        return str(target) in self.mounted


@pytest.fixture
def layers(tmp_path):
    mnt = tmp_path / "layers"
    (mnt / HEX).mkdir(parents=True)
    (mnt / ".erofs").mkdir()
    (mnt / ".erofs" / f"{HEX}.img").write_bytes(b"img")
    (mnt / ".erofs" / f"{HEX}.blob").write_bytes(b"")
    return mnt


def lowers(tmp_path, k: FakeKernel, **kw) -> ErofsLowers:
    return ErofsLowers(tmp_path / "root" / "erofs", mount=k.mount, unmount=k.unmount,
                       is_mount=k.is_mount, **kw)


def test_a_layer_is_mounted_once_and_reused(tmp_path, layers):
    k = FakeKernel()
    e = lowers(tmp_path, k)
    remote = str(layers / HEX)
    target = str(tmp_path / "root" / "erofs" / HEX)
    assert e.lower(remote) == target
    assert e.lower(remote) == target
    mounts = [c for c in k.calls if c[0] == "mount"]
    assert mounts == [("mount", str(layers / ".erofs" / f"{HEX}.img"),
                       str(layers / ".erofs" / f"{HEX}.blob"), target)]


def test_a_mount_gone_or_left_by_another_process_is_made_again(tmp_path, layers):
    k = FakeKernel()
    remote = str(layers / HEX)
    first = lowers(tmp_path, k)
    first.lower(remote)
    k.mounted.clear()  # someone unmounted it
    assert first.lower(remote) is not None
    assert sum(c[0] == "mount" for c in k.calls) == 2
    second = lowers(tmp_path, k)  # a restarted snapshotter: the old mount may be a dead daemon's
    second.lower(remote)
    assert k.calls[-2:] == [("umount", str(second.target(remote))),
                            ("mount", *k.calls[-1][1:])]


def test_without_erofs_files_the_fuse_dir_is_used(tmp_path, layers):
    (layers / ".erofs" / f"{HEX}.img").unlink()
    k = FakeKernel()
    assert lowers(tmp_path, k).lower(str(layers / HEX)) is None
    assert k.calls == []


def test_a_failing_mount_means_the_fuse_dir(tmp_path, layers):
    def refuse(img, blob, target, read_ahead_kb=0):
        raise OSError(22, "mount -t erofs: Invalid argument")
    e = ErofsLowers(tmp_path / "erofs", mount=refuse, unmount=lambda t: None)
    assert e.lower(str(layers / HEX)) is None


def test_a_mount_that_hangs_falls_back_within_the_timeout(tmp_path, layers):
    k = FakeKernel()
    k.hang = True
    e = lowers(tmp_path, k, timeout=0.3)
    t0 = time.monotonic()
    assert e.lower(str(layers / HEX)) is None
    assert time.monotonic() - t0 < 2
    k.block.set()


def test_release_and_sweep_detach_what_no_snapshot_uses(tmp_path, layers):
    k = FakeKernel()
    e = lowers(tmp_path, k)
    remote = str(layers / HEX)
    target = e.target(remote)
    e.lower(remote)
    assert e.sweep([remote]) == [] and k.is_mount(target)
    e.release(remote)
    assert not k.is_mount(target) and not target.exists()
    e.lower(remote)
    (e.dir / ("cd" * 32)).mkdir()  # a layer no snapshot names any more
    assert e.sweep([remote]) == ["cd" * 32]
    assert k.is_mount(target) and not os.path.exists(e.dir / ("cd" * 32))


def test_warm_mounts_in_the_background_once(tmp_path, layers):
    k = FakeKernel()
    e = lowers(tmp_path, k)
    remote = str(layers / HEX)
    e.warm(remote)
    e.warm(remote)
    deadline = time.monotonic() + 5
    while not k.mounted and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert [c[0] for c in k.calls if c[0] == "mount"] == ["mount"]
    assert e.lower(remote) == str(e.target(remote))  # the later Mounts find it made
    assert sum(c[0] == "mount" for c in k.calls) == 1


def test_warm_never_waits_for_another_layers_mount(tmp_path, layers):
    """warm() runs in the Prepare of a layer during the pull: while an earlier layer's mount
    is still being made (the daemon building its image), the next Prepare goes on (it waited
    for it until 2026-12-04, holding up the pull by a build's time)."""
    other = "cd" * 32
    (layers / other).mkdir()
    (layers / ".erofs" / f"{other}.img").write_bytes(b"img")
    (layers / ".erofs" / f"{other}.blob").write_bytes(b"")
    k = FakeKernel()
    k.hang = True  # every mount blocks until k.block is set
    e = lowers(tmp_path, k)
    e.warm(str(layers / HEX))
    deadline = time.monotonic() + 5
    while not e._lock.locked() and time.monotonic() < deadline:  # HEX's mount under way
        time.sleep(0.01)
    assert e._lock.locked()
    t0 = time.monotonic()
    e.warm(str(layers / other))
    assert time.monotonic() - t0 < 2  # it waited for the mount (10 s here) before
    k.block.set()
    deadline = time.monotonic() + 5
    while len(k.mounted) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(os.path.basename(t) for t in k.mounted) == sorted([HEX, other])
