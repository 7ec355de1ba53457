"""The mount daemon: wires origin, disk cache, chunk store, peers (with `[peers]`),
FUSE, control socket and metrics together, mounts, signals readiness, and always
unmounts on the way out."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import posixpath
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pyfuse3
import trio
import trio_asyncio

from .startup import StartupPrefetch, layer_prefixes
from .store import ChunkStore
from .config import Config, absolute_paths, complete
from .control import ControlLimits, ControlServer
from .discover import ManifestCache, discover_cached, find_models
from .diskcache import DiskCache
from .errors import ConfigError
from .fs import Operations
from .metrics import Metrics
from .metrics import serve as serve_metrics
from .pagepush import PagePusher
from ._perms import ROOT_MODE, private_dir, private_open
from .origin import open_origin, parse_url
from .tree import EROFS_DIR, TreeConflict, build_tree_skipping
from .tune import is_stale, mount_entry, tune_mount, unmount

log = logging.getLogger("p2pfs.daemon")


def lock_cache_dir(directory: Path) -> int:
    private_dir(directory, ROOT_MODE)  # the cache holds the plain bytes of every file read
    fd = private_open(directory / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"cache dir {directory} is in use by another p2pfs daemon "
                          "(give each mount its own --cache-dir)") from None
    return fd


def keep_freed_memory(max_chunk: int) -> bool:
    """Make glibc keep freed chunk buffers for reuse instead of unmapping them.

    Chunks are multi-MiB bytes objects, above glibc's mmap threshold, so each one was
    mmap()ed and munmap()ed. On VMs that hand freed memory back to the host, faulting
    fresh pages costs about as much as the disk read itself (DESIGN.md: 2 GiB of fresh
    memory 2.5-3 s); reused heap memory is ~10x cheaper. Returns False if not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, max(32 << 20, 2 * max_chunk)) == 1
        return libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False


def prefault_heap(nbytes: int, piece: int = 4 << 20) -> int:
    """Touch `nbytes` of heap once and free it, so that glibc (told by `keep_freed_memory`
    to keep freed memory) hands those pages out again: the memory tier's first buffers
    then cost no page faults. Measured on a cold image start here, faulting in fresh
    buffers (the kernel zeroing them, 2 MiB at a time with transparent huge pages) was
    the largest kernel cost of the daemon, on the CPU the starting container needed.
    Done before the mount is made, so it is part of the daemon's start, not of a read.
    Returns the bytes touched."""
    import numpy as np

    pieces = []
    for _ in range(max(0, nbytes) // piece):
        a = np.empty(piece, dtype=np.uint8)
        a[::4096] = 0
        pieces.append(a)
    touched = len(pieces) * piece
    del pieces
    return touched


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    if not notify_socket:
        return
    addr = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def _freeze_heap(collect: bool = False) -> None:
    """Exclude what exists now (the tree, its manifests: millions of objects for a big
    image's layers) from the cyclic garbage collector's passes. The tree lives as long as
    the mount and only grows, and each full collection walked all of it: about 7% of the
    daemon's CPU during a container start (perf; bench/RESULTS.md, "The daemon's CPU").
    Garbage frozen with it is kept, which is the price: at start-up a collection first
    clears it; after a refresh (on the trio thread, maybe during a pull) none runs, and
    the little garbage a refresh leaves stays."""
    if collect:
        gc.collect()
    gc.freeze()


async def run_daemon(cfg: Config, url: str, mountpoint: Path, *,
                     on_ready: Callable[[dict[str, Any]], None] = lambda info: None,
                     notify_socket: str | None = None) -> None:
    """Mount `url` at `mountpoint` and serve until unmounted or signalled.

    Everything that can fail on a setting (the metrics address included) fails before the
    mount is made, so a bad one leaves no mount behind."""
    mountpoint = Path(os.path.abspath(mountpoint))
    cfg = complete(absolute_paths(cfg))  # clients in other directories get these paths
    loc = parse_url(url)
    if not mountpoint.is_dir():
        if is_stale(mountpoint):
            log.warning("clearing stale mount at %s left by a dead daemon", mountpoint)
            unmount(mountpoint, lazy=True)
        if not mountpoint.is_dir():
            raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    entry = mount_entry(mountpoint)
    if entry is not None and entry[2].startswith("fuse"):
        if is_stale(mountpoint):
            log.warning("clearing stale mount at %s left by a dead daemon", mountpoint)
            unmount(mountpoint, lazy=True)
        else:
            raise ConfigError(f"{mountpoint} is already mounted; `p2pfs unmount {mountpoint}` first")
    control_path = cfg.cache.dir / "control.sock"
    if len(os.fsencode(control_path)) > 107:  # sun_path holds 108 bytes with its NUL
        raise ConfigError(f"cache dir {cfg.cache.dir} is too long a path for the control socket "
                          f"(unix sockets take at most 107 bytes); use a shorter --cache-dir")
    lock_fd = lock_cache_dir(cfg.cache.dir)
    if keep_freed_memory(cfg.fetch.max_request) and cfg.cache.memory_prefault:
        prefault_heap(min(cfg.cache.memory_size, 1 << 30))  # under the trim threshold
    metrics = Metrics()
    try:
        async with contextlib.AsyncExitStack() as stack:
            addr = cfg.mount.metrics_host_port
            bound = await stack.enter_async_context(serve_metrics(metrics, *addr)) if addr else None
            peers = None
            if cfg.peers.enabled:
                from .peer import PeerNode  # only a peer node pays for the import
                peers = PeerNode(cfg.peers, origin_url=str(loc), metrics=metrics,
                                 read_timeout=cfg.fetch.read_timeout)
                await peers.server.bind()  # a bad address fails here, before the mount
            async with trio_asyncio.open_loop():
                async with open_origin(loc, cfg.s3) as origin:
                    await _serve(cfg, loc, origin, mountpoint, on_ready, notify_socket,
                                 metrics, bound, peers)
    finally:
        os.close(lock_fd)


async def _serve(cfg, loc, origin, mountpoint: Path, on_ready, notify_socket,
                 metrics: Metrics, metrics_addr: tuple[str, int] | None, peers) -> None:
    t0 = time.monotonic()
    models, problems = await discover_cached(origin, loc, ManifestCache(cfg.cache.dir),
                                             allow_empty=cfg.mount.allow_empty)
    disk = DiskCache(cfg.cache.dir, cfg.cache.size)
    await trio.to_thread.run_sync(disk.scan)
    metrics_url = f"http://{_host(metrics_addr[0])}:{metrics_addr[1]}/metrics" if metrics_addr else None
    store = ChunkStore(origin, disk, fetch=cfg.fetch, cache=cfg.cache, metrics=metrics,
                       peers=peers.reader_tier if peers else None,
                       owner_peers=peers.owner_tier if peers else None)
    if peers:
        peers.attach(store)
    tree, conflicts = build_tree_skipping(models)
    _freeze_heap(collect=True)
    for problem in conflicts:
        log.error("%s", problem)
    problems = [*problems, *conflicts]
    control_path = cfg.cache.dir / "control.sock"
    startup = None
    if cfg.mount.startup_window > 0:
        startup = StartupPrefetch(origin=origin, store=store, tree=tree,
                                  window=cfg.mount.startup_window)
        startup.layers.update(layer_prefixes(loc.prefix, models))
    pusher = PagePusher(store) if cfg.mount.erofs_page_push else None
    if startup is not None and pusher is not None:
        startup.on_prefetched = lambda layer, locs, chunks: _offer_layer(tree, pusher, layer, locs, chunks)
    ops = Operations(tree, store, fetch=cfg.fetch, metrics=metrics,
                     attr_timeout=cfg.mount.attr_timeout,
                     negative_timeout=cfg.mount.negative_timeout, control_path=str(control_path),
                     startup=startup, pusher=pusher)
    tuning: dict[str, Any] = {}
    metrics.gauges.update({
        "cache_used_bytes": lambda: disk.stats().used_bytes,
        "cache_budget_bytes": lambda: disk.stats().budget_bytes,
        "cache_chunks": lambda: disk.stats().chunks,
        "cache_files": lambda: disk.stats().files,
        "cache_sealed_files": lambda: disk.stats().sealed_files,
        "cache_evicted_chunks": lambda: disk.stats().evicted,
        "cache_corrupt_dropped": lambda: disk.stats().corrupt_dropped,
        "cache_read_errors": lambda: disk.stats().read_errors,
        "cache_raced_misses": lambda: disk.stats().raced,
        "memory_cache_bytes": lambda: store.memory_used,
        "in_flight_chunks": lambda: store.in_flight,
        "writeback_pending": lambda: store.writeback_pending,
    })

    def status() -> dict[str, Any]:
        return {
            "source": str(loc), "mountpoint": str(mountpoint), "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - t0, 1),
            "models": [{"path": p or "/", "digest": d} for p, d in sorted(tree.models.items())],
            "model_problems": problems, "cache_dir": str(cfg.cache.dir), "tuning": tuning,
            "metrics_url": metrics_url,
            **metrics.snapshot(),
            **({"peers": peers.status()} if peers else {}),
            **({"startup": dict(startup.stats)} if startup else {}),
            **({"page_push": dict(pusher.stats)} if pusher else {}),
        }

    manifests = ManifestCache(cfg.cache.dir)
    mounted = list(models)

    async def refresh(paths: tuple[str, ...] | None) -> dict[str, Any]:
        """Attach models (image layers) published since the mount, without remounting."""
        t = time.monotonic()
        found, found_problems = await find_models(origin, loc, dict(tree.models), paths)
        added, refused = [], []
        touched: dict[int, set[bytes]] = {}
        for d, m, prefix in found:
            if tree.models.get(d) == m.digest:
                continue  # a refresh running at the same time attached it
            if d in tree.models:
                refused.append(f"{d}: manifest is now {m.digest}, mounted {tree.models[d]}; "
                               "remount to see the new version")
                continue
            try:
                for inode, names in tree.attach(d, m, prefix).items():
                    touched.setdefault(inode, set()).update(names)
            except TreeConflict as exc:
                refused.append(f"{d} not attached: {exc}")
                continue
            added.append(d)
            mounted.append((d, m, prefix))
            if startup is not None:
                startup.layers.update(layer_prefixes(loc.prefix, [(d, m, prefix)]))
        for problem in refused:
            log.error("refresh: %s", problem)
        if added:
            log.info("refresh: attached %d model(s): %s", len(added), ", ".join(added[:10]))
            _freeze_heap()
            await trio.to_thread.run_sync(manifests.save, loc, mounted)
            # Names were added: the kernel's attributes of those directories are stale, and
            # so is a negative entry it cached for a name looked up before it existed.
            for inode, names in touched.items():
                await trio.to_thread.run_sync(_invalidate, inode, names)
        return {"added": added, "problems": [*found_problems, *refused],
                "models": len(tree.models), "seconds": round(time.monotonic() - t, 3)}

    options = {f"fsname=p2pfs:{loc}", "subtype=p2pfs", "ro", "default_permissions", "noatime"}
    if cfg.mount.allow_other:
        options.add("allow_other")
    control = ControlServer(control_path, tree=tree, store=store, status=status,
                            metrics_text=metrics.render, group=cfg.mount.control_group,
                            limits=ControlLimits(
                                max_connections=cfg.mount.control_max_connections,
                                idle_timeout=cfg.mount.control_idle_timeout,
                                send_timeout=cfg.mount.control_idle_timeout,
                                fill_idle_timeout=cfg.mount.control_fill_idle_timeout),
                            refresh=refresh)
    pyfuse3.init(ops, str(mountpoint), options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await nursery.start(control.serve)
            if startup:
                await nursery.start(startup.run)
            if pusher:
                await nursery.start(pusher.run)
            if peers:
                await nursery.start(peers.run)
            nursery.start_soon(_watch_signals, peers, cfg.peers.drain_timeout)

            async def fuse_main() -> None:
                try:
                    await pyfuse3.main()
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_main)
            tuning.update(await trio.to_thread.run_sync(lambda: tune_mount(
                mountpoint, read_ahead_kb=cfg.mount.read_ahead_kb,
                max_background=cfg.mount.max_background)))
            info = {"mountpoint": str(mountpoint), "source": str(loc), "pid": os.getpid(),
                    "models": sorted(p or "/" for p in tree.models), "problems": problems,
                    "tuning": tuning, "control": str(control_path), "metrics_url": metrics_url,
                    "seconds": round(time.monotonic() - t0, 3)}
            log.info("mounted %s at %s: %d model(s), tuning %s", loc, mountpoint, len(models), tuning)
            if peers:
                peers.set_ready(True)  # serve peers only once the mount is up
                info["peer"] = peers.node_id
            on_ready(info)
            sd_notify(notify_socket, f"READY=1\nSTATUS=serving {loc} at {mountpoint}")
    finally:
        sd_notify(notify_socket, "STOPPING=1")
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def _offer_layer(tree, pusher: PagePusher, layer: str, locs, chunks) -> None:
    """A start-up list's prefetched chunks of `layer`: into its EROFS blob's page cache."""
    node = tree.lookup_path(posixpath.join(posixpath.dirname(layer), EROFS_DIR,
                                           posixpath.basename(layer) + ".blob"))
    if node is not None and node.virtual is not None:  # parked until the blob is open
        pusher.offer(node.virtual[0], locs, chunks)


def _invalidate(inode: int, names: set[bytes]) -> None:
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError:  # ENOENT: the kernel does not hold the inode; nothing to drop
        pass
    for name in names:
        try:
            pyfuse3.invalidate_entry(inode, name)
        except OSError:  # ENOENT: no entry cached under that name
            pass


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _watch_signals(peers, drain_timeout: float) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            if peers:
                # Leave the ring first: new peer requests get 503 (the others move on to
                # the next rank), answers under way finish, then the mount goes.
                log.info("signal %s: draining peer requests (up to %gs)",
                         signal.Signals(sig).name, drain_timeout)
                peers.drain()
                await peers.wait_drained(drain_timeout)
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
            return
