"""Kernel-side tuning of a FUSE mount, applied right after mounting.

pyfuse3 exposes no max_read/max_readahead/max_background options, so we set the mount's
backing-device read-ahead and the fusectl per-connection limits through sysfs. Every step
is best effort: a value that cannot be set is reported, not fatal. Also: finding and
clearing a stale mount left by a crashed daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from pathlib import Path

log = logging.getLogger("p2pfs.tune")
FUSECTL = Path("/sys/fs/fuse/connections")


def mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[int, int, str] | None:
    """(major, minor, fstype) of the mount at `mountpoint`, from /proc/self/mountinfo,
    without touching the mount itself (a stat could block on a dead FUSE daemon)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if mnt == target:
                sep = fields.index("-")
                major, minor = fields[2].split(":")
                found = (int(major), int(minor), fields[sep + 1])  # the last one wins
    return found


def tune_mount(mountpoint: str | os.PathLike[str], *, read_ahead_kb: int, max_background: int) -> dict[str, int | str]:
    applied: dict[str, int | str] = {}
    entry = mount_entry(mountpoint)
    if entry is None:
        return {"error": "mount not found in /proc/self/mountinfo"}
    major, minor, _ = entry
    bdi = Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")
    try:
        bdi.write_text(str(read_ahead_kb))
        applied["read_ahead_kb"] = int(bdi.read_text())
    except OSError as exc:
        applied["read_ahead_kb_error"] = str(exc)
    try:
        if FUSECTL.is_dir() and not any(FUSECTL.iterdir()) and not os.path.ismount(FUSECTL):
            subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)],
                           check=False, capture_output=True, timeout=10)
        conn = FUSECTL / str(os.makedev(major, minor))
        (conn / "max_background").write_text(str(max_background))
        (conn / "congestion_threshold").write_text(str(max(1, max_background * 3 // 4)))
        applied["max_background"] = int((conn / "max_background").read_text())
    except OSError as exc:
        applied["max_background_error"] = str(exc)
    return applied


def is_stale(mountpoint: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """True if a FUSE mount sits at `mountpoint` but its daemon is gone.

    A stat may be answered from the kernel's attribute cache even when the daemon is dead,
    so we open the directory, which always asks the daemon (ENOTCONN or ECONNABORTED when
    it is gone). It
    runs in a thread: a live but hung daemon must not hang us too."""
    entry = mount_entry(mountpoint)
    if entry is None or not entry[2].startswith("fuse"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            result.append(False)
        except OSError as exc:
            result.append(exc.errno in (errno.ENOTCONN, errno.ECONNABORTED))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount a FUSE mount (works whether or not its daemon still runs)."""
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        # fusermount3 refuses some mounts made by root in other namespaces; umount(8) works.
        r2 = subprocess.run(["umount"] + (["-l"] if lazy else []) + [str(mountpoint)],
                            capture_output=True, text=True, timeout=30)
        if r2.returncode != 0:
            raise OSError(f"unmount {mountpoint} failed: {r.stderr.strip() or r2.stderr.strip()}")
