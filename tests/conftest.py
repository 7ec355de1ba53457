"""Fixtures that start real components on loopback and always tear them down:
a SeaweedFS S3 server, and p2pfs mounts run as real daemon processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from p2pfs.seaweed import SeaweedServer

S3_ENV = {"AWS_ACCESS_KEY_ID": "p2pfs-test", "AWS_SECRET_ACCESS_KEY": "p2pfs-test",
          "AWS_REGION": "us-east-1"}
for k, v in S3_ENV.items():
    os.environ.setdefault(k, v)

HAVE_FUSE = os.geteuid() == 0 and os.path.exists("/dev/fuse")
needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs root and /dev/fuse for a real FUSE mount")


def p2pfs_cmd(*args: str, endpoint: str | None = None, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    r = subprocess.run([sys.executable, "-m", "p2pfs", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"p2pfs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        server.create_bucket("models")
        yield server
    finally:
        server.stop()


class Mount:
    """A p2pfs daemon process serving one mountpoint."""

    def __init__(self, url: str, mountpoint: Path, cache_dir: Path, endpoint: str, args: list[str]):
        self.url, self.path, self.cache_dir, self.endpoint = url, mountpoint, cache_dir, endpoint
        self.args = args
        self.pid = 0
        self.info: dict = {}

    def start(self) -> "Mount":
        r = p2pfs_cmd("mount", self.url, str(self.path), "--cache-dir", str(self.cache_dir),
                      "--json", *self.args, endpoint=self.endpoint)
        self.info = json.loads(r.stdout.strip().splitlines()[-1])
        self.pid = self.info["pid"]
        return self

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers kill(0); check its state.
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split(")")[1].split()[0] != "Z"
        except OSError:
            return False

    def status(self) -> dict:
        return json.loads(p2pfs_cmd("status", str(self.path), "--json").stdout)

    def stop(self) -> None:
        """Unmount (the daemon then exits); kill it by PID if it lingers."""
        if not self.pid:
            return
        p2pfs_cmd("unmount", str(self.path), check=False)
        deadline = time.monotonic() + 15
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            p2pfs_cmd("unmount", "--lazy", str(self.path), check=False)
        self.pid = 0


@pytest.fixture
def mount_factory(tmp_path) -> Iterator:
    mounts: list[Mount] = []

    def make(url: str, endpoint: str, *args: str, cache_dir: Path | None = None,
             mountpoint: Path | None = None) -> Mount:
        mp = mountpoint or tmp_path / f"mnt{len(mounts)}"
        mp.mkdir(exist_ok=True)
        m = Mount(url, mp, cache_dir or tmp_path / f"cache{len(mounts)}", endpoint, list(args))
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()


def drop_page_cache() -> None:
    """Make the next read of a mounted file reach the daemon, not the kernel's cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _stop_snapshotters():
    """Snapshotter processes a test started (tests/image_node.py) are stopped when it ends,
    whether or not the test reached its own teardown."""
    yield
    node_module = sys.modules.get("image_node")
    if node_module is not None:
        while node_module.STARTED:
            node_module.STARTED.pop().stop()
