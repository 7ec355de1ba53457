"""FUSE operations (pyfuse3): the only place where p2pfs errors become errno values.

Read-only. Files are opened with keep_cache (content is immutable, so the kernel page cache
stays valid across opens); attributes and names are cached for `attr_timeout`, the absence
of a name for `negative_timeout`. Each open file tracks its read position; sequential reads
grow a read-ahead window that is fetched in the background through the chunk store.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import stat
import time
from dataclasses import dataclass

import pyfuse3
import trio

from .store import ChunkStore
from .config import FetchConfig
from .errors import FetchTimeout, IntegrityError, OriginUnavailable, P2PFSError, RecentlyFailed
from .metrics import Metrics
from .pagepush import PagePusher
from .plan import chunk_span, overlaps, slice_reply
from .tree import EROFS_DIR, ROOT_INODE, Node, Tree

log = logging.getLogger("p2pfs.fs")

CONTROL_XATTR = b"user.p2pfs.control"
_EROFS_NAME = EROFS_DIR.encode()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


@dataclass(slots=True)
class _Open:
    node: Node
    next_off: int = 0  # where a sequential reader reads next
    window: int = 0  # current read-ahead window, bytes
    ahead_to: int = 0  # file offset read-ahead has been issued up to


class Operations(pyfuse3.Operations):
    def __init__(self, tree: Tree, store: ChunkStore, *, fetch: FetchConfig, metrics: Metrics,
                 attr_timeout: float, negative_timeout: float = 0.0, control_path: str = "",
                 startup=None, pusher: PagePusher | None = None) -> None:
        super().__init__()
        self.pusher = pusher  # EROFS blobs: prefetched bytes into the kernel's page cache
        self.startup = startup  # StartupPrefetch: image layers' start-up lists
        self.tree = tree
        self.store = store
        self.fetch = fetch
        self.metrics = metrics
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self.control_path = control_path
        self._open: dict[int, _Open] = {}
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()
        self._last_log: dict[str, float] = {}
        self._pack_ahead_to: dict[str, int] = {}  # per pack: stored offset read-ahead reached
        self._building: dict[int, trio.Event] = {}  # EROFS images being built, by id

    # -- helpers --------------------------------------------------------------------------
    def _node(self, inode: int) -> Node:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        e = node.entry
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.st_mode
        a.st_nlink = node.nlink
        a.st_uid = e.uid if e else 0
        a.st_gid = e.gid if e else 0
        a.st_rdev = e.rdev if e else 0
        a.st_size = node.size
        a.st_blksize = 1 << 20
        a.st_blocks = (node.size + 511) // 512
        mtime = e.mtime_ns if e and e.mtime_ns else self._mount_time_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _should_log(self, kind: str) -> bool:
        """At most one line per kind per 5 s: a failing store must not flood the log."""
        now = time.monotonic()
        if now - self._last_log.get(kind, 0.0) > 5.0:
            self._last_log[kind] = now
            return True
        return False

    def _eio(self, exc: BaseException, what: str) -> pyfuse3.FUSEError:
        if self._should_log(type(exc).__name__):
            hint = ""
            if isinstance(exc, (FetchTimeout, OriginUnavailable)):
                hint = " (object store slow or unreachable; cached data is still served)"
            elif isinstance(exc, IntegrityError):
                hint = " (data did not match its digest and was not served)"
            elif isinstance(exc, RecentlyFailed):
                hint = " (failing fast: the same chunk failed moments ago; see fetch.fail_fast)"
            log.error("%s failed: %s%s", what, exc, hint)
        self.metrics.errors["eio"] += 1
        return pyfuse3.FUSEError(errno.EIO)

    # -- namespace ------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        parent = self._node(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            if not self.negative_timeout:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._negative()
        node = self.tree.nodes[inode]
        if node.virtual is not None and not await self._erofs_ready(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(node)

    async def _erofs_ready(self, node: Node) -> bool:
        """Build a layer's EROFS image on the first lookup of its files (in a worker
        thread: it is CPU work); False when the layer cannot be expressed as EROFS."""
        image = node.virtual[0]  # type: ignore[index]
        if not image.ready:
            done = self._building.get(id(image))
            if done is None:
                if self.startup is not None:
                    # About to be mounted: its start-up list (if any) is fetched while the
                    # image is built, not only once the mount opens the blob.
                    self.startup.touch(node)
                done = self._building[id(image)] = trio.Event()
                try:
                    await trio.to_thread.run_sync(image.build)
                    # The image lives as long as the mount: out of the collector's passes,
                    # like the tree (p2pfs/daemon.py, _freeze_heap).
                    gc.freeze()
                finally:
                    done.set()
                    del self._building[id(image)]
                if image.error:
                    log.warning("layer %s is served through FUSE only, not as EROFS: %s",
                                image.layer, image.error)
            else:
                await done.wait()
        return image.image is not None

    def _negative(self) -> pyfuse3.EntryAttributes:
        """No such name, cached by the kernel for negative_timeout (inode 0 is libfuse's
        negative entry): overlayfs looks every name up in each lower layer above the one
        that has it, on every new container, so without this each start asks again. A
        refresh that adds the name drops the cached entry (daemon `_invalidate`)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.negative_timeout
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return self._attr(self._node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.st_mode) or node.entry is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target.encode()

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token) -> None:
        node = self._node(fh)
        assert node.children is not None
        names = sorted(node.children)
        for i in range(start_id, len(names)):
            child = self.tree.nodes[node.children[names[i]]]
            if child.virtual is not None and child.virtual[0].image is None or (
                    names[i] == _EROFS_NAME and child.entry is None):
                continue  # the EROFS dir is found by name only; its files once built
            if not pyfuse3.readdir_reply(token, names[i], self._attr(child), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._node(inode)
        return not (mode & os.W_OK)

    async def statfs(self, ctx: pyfuse3.RequestContext):
        s = pyfuse3.StatvfsData()
        total = sum(n.size for n in self.tree.nodes.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = min((total + 4095) // 4096, 2**64 - 1)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- xattrs ---------------------------------------------------------------------------
    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        out = {k.encode(): v for k, v in (node.entry.xattrs.items() if node.entry else ())}
        if node.inode == ROOT_INODE and self.control_path:
            out[CONTROL_XATTR] = self.control_path.encode()
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(self._node(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext):
        return list(self._xattrs(self._node(inode)))

    # -- files ----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext):
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.virtual is not None and node.virtual[0].image is not None:
            if node.virtual[1] != "blob":
                return self._new_handle(node)
            # EROFS mounted the blob. While the layer's start-up reads are recorded, the
            # kernel's read-ahead on the blob must not run past the files EROFS reads (see
            # StartupPrefetch.bypass_page_cache), so this open bypasses the page cache; and
            # then nothing is pushed into it.
            info = self._new_handle(node)
            layer = node.virtual[0]
            layer.direct = self.startup is not None and await self.startup.bypass_page_cache(node)
            layer.opened = True
            if layer.direct:
                info.direct_io, info.keep_cache = True, False
            elif self.pusher is not None:
                self.pusher.opened(layer)  # a start-up list's chunks that came before the open
            return info
        if node.entry is None or node.entry.type != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if node.children is not None else errno.EINVAL)
        return self._new_handle(node)

    def _new_handle(self, node: Node) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = _Open(node)
        if self.startup is not None:
            self.startup.touch(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._open.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if h.node.virtual is not None:
            return await self._read_erofs(h.node, off, size)
        entry = h.node.entry
        assert entry is not None
        span = chunk_span(entry, off, size)
        if not span:
            return b""
        t0 = time.monotonic()
        if self.startup is not None:
            self.startup.record(h.node, span)
        self._readahead(h, off, size)
        locs = h.node.locs(span)
        if self.fetch.pack_readahead and (self.startup is None or self.startup.guess_ahead(h.node)):
            self._pack_ahead(locs[-1])
        try:
            chunks = await self.store.get(locs, used=overlaps(entry, span, off, size))
        except P2PFSError as exc:
            raise self._eio(exc, f"read {h.node.model or '/'} inode {h.node.inode} @{off}+{size}")
        data = slice_reply(entry, span, chunks, off, size)
        self.metrics.read_latency.observe(time.monotonic() - t0)
        self.metrics.reads += 1
        self.metrics.read_bytes += len(data)
        return data

    async def _read_erofs(self, node: Node, off: int, size: int) -> bytes | memoryview:
        """A read of a layer's EROFS image (from memory) or blob: the blob's bytes are the
        layer's files at the offsets the image gives them, fetched and verified through the
        same chunk store as reads of the files themselves; the gaps between files are zeros."""
        layer, which = node.virtual  # type: ignore[misc]
        img = layer.image
        assert img is not None
        if which == "img":
            return memoryview(img.meta)[off:off + size]
        end = min(off + size, img.blob_size)
        if off >= end:
            return b""
        t0 = time.monotonic()
        parts, locs, used = [], [], []
        for extent, foff, n in img.covering(off, end - off):
            fnode = self.tree.nodes[layer.paths[extent.path]]
            e = fnode.entry
            assert e is not None
            span = chunk_span(e, foff, n)
            parts.append((fnode, span, foff, n, extent.offset + foff - off))
            locs.extend(fnode.locs(span))
            used.extend(overlaps(e, span, foff, n))
            if self.startup is not None:
                self.startup.record(fnode, span)
        if not locs:
            return bytes(end - off)
        if self.fetch.pack_readahead and (self.startup is None or self.startup.guess_ahead(node)):
            # A layer without a start-up list: the neighbours are fetched, and pushed into
            # the blob's page cache once here (a listed layer's list is pushed as it lands),
            # unless its start-up reads are being recorded: a pushed page is a read the
            # list would never see.
            ahead = self._pack_ahead(locs[-1])
            if ahead and self.pusher is not None and not (
                    self.startup is not None and self.startup.recording(node)):
                self.pusher.offer(layer, ahead)
        try:
            chunks = await self.store.get(locs, used=used)
        except P2PFSError as exc:
            raise self._eio(exc, f"read {layer.layer} EROFS blob @{off}+{size}")
        if len(parts) == 1 and parts[0][4] == 0 and parts[0][3] == end - off:
            fnode, span, foff, n, _ = parts[0]
            data: bytes | memoryview | bytearray = slice_reply(fnode.entry, span, chunks, foff, n)
        else:
            data = bytearray(end - off)
            i = 0
            for fnode, span, foff, n, at in parts:
                data[at:at + n] = slice_reply(fnode.entry, span, chunks[i:i + len(span)], foff, n)
                i += len(span)
        self.metrics.read_latency.observe(time.monotonic() - t0)
        self.metrics.reads += 1
        self.metrics.read_bytes += len(data)
        return data

    def _readahead(self, h: _Open, off: int, size: int) -> None:
        """Grow a read-ahead window while reads move forward through the file.

        The kernel keeps several requests in flight (max_background) and they may arrive
        out of order, so "sequential" means: near the furthest point read so far, not
        exactly at it. A jump further away resets the window (random access gets none)."""
        entry = h.node.entry
        assert entry is not None
        end = off + size
        near = h.next_off - self.fetch.readahead_max <= off <= h.next_off + self.fetch.readahead_min
        top = min(self.fetch.readahead_max, self.store.readahead_limit)
        if h.window == 0 and off == 0 or near and end > h.next_off:
            h.window = min(max(h.window * 2, self.fetch.readahead_min), top)
        elif not near:
            h.window, h.ahead_to = 0, 0
        h.next_off = max(h.next_off, end) if near else end
        if not h.window:
            return
        start = max(h.next_off, h.ahead_to)
        stop = min(entry.size, h.next_off + h.window)
        if stop - start < max(self.fetch.max_request, self.fetch.readahead_min // 2) and stop < entry.size:
            return  # issue read-ahead in steps of whole requests, not per kernel request
        span = chunk_span(entry, start, stop - start)
        if span:
            self.store.prefetch(h.node.locs(span))
            h.ahead_to = stop
            if log.isEnabledFor(logging.DEBUG):
                log.debug("read-ahead inode %d: read %d+%d, window %d, fetch [%d, %d)",
                          h.node.inode, off, size, h.window, start, stop)

    def _pack_ahead(self, loc) -> list:
        """Fetch the pack bytes after `loc` in the background (image layers only: a pack
        holds many files in tar order, and a start-up reads neighbours together). Issued
        once per stretch of pack: a read inside what was issued already asks nothing.
        Returns the chunks it fetches (an EROFS blob's page cache wants them too)."""
        end = loc.ref.offset + loc.ref.length
        window = self.fetch.pack_readahead
        reached = self._pack_ahead_to.get(loc.key, 0)
        if end + window // 2 <= reached <= end + 2 * window:
            return []  # this stretch is issued already
        far_behind = reached > end + 2 * window  # another file, earlier in the pack
        start = end if far_behind else max(reached, end)
        ahead = [n for n in self.tree.pack_neighbours(loc, window)
                 if n.ref.offset >= start and not self.store.disk.may_hold(n.digest)]
        self._pack_ahead_to[loc.key] = end + window if far_behind else max(reached, end + window)
        if ahead:
            self.store.prefetch(ahead)
        return ahead

    async def forget(self, inode_list) -> None:
        return None

    # Writes are refused by the read-only mount option; these make it explicit.
    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)




def _guard(name: str, fn):
    """Wrap one FUSE handler so that an exception it did not mean to raise becomes EIO
    plus one logged traceback. pyfuse3 ends `main()` (the whole mount, every model) on
    any exception other than FUSEError; a local user must not be able to do that."""

    @functools.wraps(fn)
    async def handler(self: "Operations", *args):
        self.metrics.fuse_ops[name] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except P2PFSError as exc:
            raise self._eio(exc, name) from None
        except Exception as exc:  # noqa: BLE001 - a bug of ours (or bad input we missed)
            self.metrics.errors["internal"] += 1
            self.metrics.errors["eio"] += 1
            if self._should_log("internal:" + name):
                log.exception("unexpected %s in FUSE %s%r; answered EIO (please report)",
                              type(exc).__name__, name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


#: Every operation this filesystem implements; each goes through `_guard`.
_OPS = ("lookup", "getattr", "readlink", "opendir", "readdir", "releasedir", "access", "statfs",
        "getxattr", "listxattr", "open", "release", "read", "forget", "setxattr", "removexattr")
for _name in _OPS:
    setattr(Operations, _name, _guard(_name, getattr(Operations, _name)))
