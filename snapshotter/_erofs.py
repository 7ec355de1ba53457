"""Remote layers mounted as EROFS: the kernel serves their metadata, p2pfs only their data.

A remote layer `<mount>/<hex>` on the p2pfs layers mount also offers `<mount>/.erofs/<hex>.img`
(an EROFS metadata image built from its manifest) and `.blob` (its files' bytes). Mounted
file-backed at `ROOT/erofs/<hex>`, that mount is what overlayfs gets as the layer's
lowerdir: lookups, getattr, getxattr and readdir are answered by the kernel from EROFS's
caches, and only data reads reach the FUSE daemon, as reads of the blob. Why and the
measurements: docs/ARCHITECTURE.md, "Image layers through EROFS".

One mount per layer, shared by every snapshot (and namespace) over it; made when mounts over
it are first handed out, outside the store's lock and within a bounded time (the image is
built on the daemon's first lookup, about 0.5 s for 16,000 entries), or in the background
(`warm`) as soon as the pull serves the layer remotely.
Anything that fails (no EROFS in the kernel, a layer EROFS cannot express, a slow daemon)
means the FUSE dir is the lowerdir, as before: EROFS is an optimization, never a new way
for a start to fail. A mount is made again when the layers mount's device changed (the
p2pfs daemon restarted: the old one's files are gone) and once per snapshotter process
(a mount left by an earlier process may be of a daemon that is gone); the old one is
detached, so containers using it keep it. A layer's mount is detached when its last
snapshot is removed, and by cleanup when no snapshot names it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from p2pfs import erofs
from p2pfs.tree import EROFS_DIR

from ._errors import Unavailable
from ._layerfs import Prober

log = logging.getLogger("snapshotter.erofs")


class ErofsLowers:
    """EROFS mounts of remote layers under `root` (ROOT/erofs)."""

    def __init__(self, root: Path, *, timeout: float = 10.0, max_hung: int = 4,
                 read_ahead_kb: int = 1024,
                 mount: Callable[..., None] = erofs.mount,
                 unmount: Callable[[str], None] = erofs.unmount,
                 is_mount: Callable[[Path], bool] = os.path.ismount) -> None:
        self.dir = Path(root)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.prober = Prober(timeout, max_hung)
        self._mount, self._unmount, self._is_mount = mount, unmount, is_mount
        self.read_ahead_kb = read_ahead_kb
        self._lock = threading.Lock()        # mounts and _mounted (held across a mount)
        self._warm_lock = threading.Lock()   # _warmed only: warm() never waits on a mount
        self._mounted: dict[str, int] = {}   # remote dir -> st_dev of its layers mount
        self._failed: set[str] = set()       # remote dirs EROFS could not mount (logged once)
        self._warmed: set[str] = set()       # remote dirs whose background mount was started

    def warm(self, remote: str) -> None:
        """Mount the layer now, in the background (a layer served remotely during a pull:
        the container created after the pull wants it). Mounting looks up the layer's image,
        which is what starts the daemon's start-up prefetch for the layer: made only when
        the container is created, the prefetch would race the container's own reads."""
        with self._warm_lock:  # not the mount lock: a Prepare must not wait for a mount
            if remote in self._warmed:
                return
            self._warmed.add(remote)
        threading.Thread(target=self.lower, args=(remote,), daemon=True,
                         name=f"erofs mount {os.path.basename(remote)[:12]}").start()

    def target(self, remote: str) -> Path:
        return self.dir / os.path.basename(remote)

    def lower(self, remote: str) -> str | None:
        """The EROFS mount of the remote layer dir `remote`, mounted if it is not (yet, or
        any longer): None means use `remote` itself (through FUSE)."""
        state: dict[str, str | None] = {"path": None}

        def ensure() -> None:
            state["path"] = self._ensure(remote)

        try:
            err = self.prober.run(f"EROFS mount of {remote}", ensure)
        except Unavailable as exc:
            err = exc
        if err is not None:
            if remote not in self._failed:
                self._failed.add(remote)
                log.warning("layer %s: no EROFS mount (%s); served through FUSE",
                            os.path.basename(remote)[:12], err)
            return None
        return state["path"]

    def _ensure(self, remote: str) -> str | None:
        mount, hex_ = os.path.split(remote)
        img = os.path.join(mount, EROFS_DIR, f"{hex_}.img")
        blob = os.path.join(mount, EROFS_DIR, f"{hex_}.blob")
        try:
            os.stat(img)  # the daemon builds the image on this first lookup
        except FileNotFoundError:
            return None   # a daemon without EROFS files, or a layer EROFS cannot express
        dev = os.stat(mount).st_dev
        target = self.target(remote)
        with self._lock:
            if self._mounted.get(remote) == dev and self._is_mount(target):
                return str(target)
            self._unmount(str(target))  # an earlier process's, or of a daemon that is gone
            target.mkdir(mode=0o755, exist_ok=True)
            self._mount(img, blob, str(target), read_ahead_kb=self.read_ahead_kb)
            self._mounted[remote] = dev
            self._failed.discard(remote)
        log.info("layer %s mounted as EROFS at %s", hex_[:12], target)
        return str(target)

    def release(self, remote: str) -> None:
        """The last snapshot over `remote` is gone: detach its mount."""
        with self._lock:
            self._mounted.pop(remote, None)
            with self._warm_lock:
                self._warmed.discard(remote)  # a later pull of the layer mounts it early again
            self._drop(self.target(remote))

    def sweep(self, in_use: Iterable[str]) -> list[str]:
        """Detach and remove the mounts no remote dir in `in_use` names; their names."""
        keep = {os.path.basename(r) for r in in_use}
        gone = []
        with self._lock:
            for entry in os.scandir(self.dir):
                if entry.name not in keep:
                    self._drop(Path(entry.path))
                    gone.append(entry.name)
            self._mounted = {r: d for r, d in self._mounted.items()
                             if os.path.basename(r) in keep}
            with self._warm_lock:
                self._warmed = {r for r in self._warmed if os.path.basename(r) in keep}
        return gone

    def _drop(self, target: Path) -> None:
        try:
            self._unmount(str(target))
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                log.warning("could not remove the EROFS mount %s: %s", target, exc)



def mounts_under(root: Path) -> list[str]:
    """The mount points of the EROFS mounts under `root`, from /proc/self/mountinfo."""
    base = os.path.realpath(root) + os.sep
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            if right.split()[0] == "erofs" and (point + os.sep).startswith(base):
                out.append(point)
    return out


def detach_all(root: Path) -> list[str]:
    """Detach every EROFS mount under `root` (tearing a node down: a test, a benchmark, an
    uninstall); the mount points detached. A serving snapshotter leaves its mounts to the
    containers that use them."""
    out = mounts_under(root)
    for point in sorted(out, reverse=True):
        erofs.unmount(point)
    return out
