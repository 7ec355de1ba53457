"""p2pfs awareness: ask the daemon to fetch a file in the order we read it, and `warm`.

While the loader's readers pull a shard through the FUSE mount, a background thread holds a
`prefetch` request for that shard open on the daemon's control socket. The daemon then
fetches every chunk in file order with its full parallelism; its single-flight makes our
reads and its prefetch share fetches, so network fetch, disk write-back and our device copy
overlap instead of following each other.

Shards are prefetched one after the other, in load order. Closing the control connection
cancels a prefetch on the daemon's side, which is how `Prefetcher.close()` stops early
(the daemon sends progress every 0.25 s, so we notice a stop request that quickly).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import PrefetchError

log = logging.getLogger("gpuload.p2pfs")
SILENCE_TIMEOUT = 120.0  # seconds without a progress line before we call the daemon stuck


def mount_of(path: str | os.PathLike[str]) -> Path | None:
    """The p2pfs mount holding `path`, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # FUSE mounts have anonymous devices (major 0); a file on a real block device cannot be
    # on p2pfs, and checking that first keeps even the p2pfs client out of plain local loads.
    if os.major(st.st_dev) != 0:
        return None
    try:
        from p2pfs.control.client import find_mount
    except ImportError:
        # gpuload alone (a replica's image: torch, numpy, safetensors, no p2pfs): the daemon's
        # control socket is out of reach anyway, so the file is read through the mount.
        return None
    return find_mount(path)


def _stream(path: Path, stop: threading.Event | None,
            progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """One prefetch request, read to its end (or until `stop`)."""
    from p2pfs.control.client import mount_relative, request
    from p2pfs.errors import P2PFSError

    mnt = mount_of(path)
    if mnt is None:
        raise PrefetchError(f"{path} is not on a p2pfs mount")
    rel = mount_relative(path, mnt)
    last: dict[str, Any] = {}
    try:
        replies = request(mnt, {"op": "prefetch", "path": rel}, timeout=SILENCE_TIMEOUT)
        try:
            for msg in replies:
                last = msg
                if progress is not None and "done" in msg:
                    progress(int(msg["done"]), int(msg["total"]))
                if stop is not None and stop.is_set():
                    return {"ok": False, "stopped": True}
        finally:
            replies.close()  # closes the socket: the daemon cancels what is left
    except P2PFSError as exc:
        raise PrefetchError(f"{path}: {exc}") from None
    except (OSError, ValueError) as exc:  # socket timeout, reset, garbage
        raise PrefetchError(f"{path}: prefetch request failed: {exc}") from None
    if not last.get("ok"):
        raise PrefetchError(f"{path}: p2pfs prefetch failed: {last.get('error', 'no answer')}")
    return last


class Prefetcher:
    """Prefetch `paths` (those on p2pfs) one after another in a thread we own and join."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [p for p in paths if mount_of(p) is not None]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.results: list[dict[str, Any]] = []

    def __enter__(self) -> "Prefetcher":
        if self.paths:
            self._thread = threading.Thread(target=self._run, name="gpuload-prefetch",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for p in self.paths:
                if self._stop.is_set():
                    return
                self.results.append(_stream(p, self._stop, None))
        except BaseException as exc:  # noqa: BLE001 - a hint failed; reads still work
            self.error = exc
            log.warning("p2pfs prefetch failed (loading continues through reads): %s", exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def warm(path: str | os.PathLike[str], *,
         progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Make a file or directory on a p2pfs mount local; return when it is. Raises
    PrefetchError if it is not on a p2pfs mount or the daemon fails."""
    return _stream(Path(path), None, progress)


def open_local(paths: Sequence[Path]) -> list[int] | None:
    """A descriptor of the local copy of every one of `paths` (each on a p2pfs mount), or
    None (every descriptor closed) if any is not whole on the daemon's local disk yet, the
    daemon is older or refuses: then the load goes through `fill` or the mount, as before.
    A local copy is read like any local file, at local-disk speed, no FUSE in the way."""
    try:
        from p2pfs.control.client import open_local as open_one
        from p2pfs.errors import P2PFSError
    except ImportError:
        return None
    fds: list[int] = []
    try:
        for p in paths:
            fd = open_one(p)
            if fd is None:
                log.info("p2pfs: %s is not whole on local disk yet; loading through the daemon", p)
                break
            fds.append(fd)
        else:
            return fds
    except (P2PFSError, OSError, ValueError) as exc:  # ValueError: a garbled answer
        log.info("p2pfs local copy unavailable (loading through the daemon): %s", exc)
    for fd in fds:
        os.close(fd)
    return None
