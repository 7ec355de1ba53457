"""Content-addressed chunk cache on local disk.

Layout (docs/FORMAT.md): `<dir>/chunks/<sha256[:2]>/<sha256>.<xxh3_64 hex>`, holding the
uncompressed chunk. The xxh3 in the name is checked on every read-back; a file that fails
the check is deleted and reported as a miss, so corrupt bytes are never served. Writes go
to a temp file in the same directory and are renamed into place (atomic); there is no fsync:
a file torn by a power loss fails its checksum and is refetched.

Every directory is 0700 and every file 0600 (the cache dir itself 0711), created so whatever
the umask, and an existing cache is tightened by `scan`: the chunks are the plain bytes of
files whose modes on the mount may deny other users (`_perms`).

The budget is never exceeded, not even for the length of one write: room for a chunk is
made (least recently used chunks evicted and their files unlinked) before its temp file is
written and held until it is renamed into place, and the bytes of a dropped file count until
it is unlinked (`ByteLRU`'s held bytes). So the chunk files on disk, temp files included,
never add up to more than `budget`. (A reader that still holds an evicted file open keeps
its blocks until it closes it.) A write that finds the room held by other writes in
progress waits for them.

A read that cannot be served is a miss, counted by why: `corrupt_dropped` (the bytes or the
file type were wrong), `read_errors` (the file could not be read: an OSError other than
ENOENT) and `raced` (the file vanished between lookup and read, evicted or removed
meanwhile: not an error). Corrupt and unreadable files are dropped from the index and
removed, so a bad path is never tried twice; the first of each kind is logged as a warning.

All methods are synchronous and thread-safe: the daemon calls them through
`trio.to_thread`. The index is rebuilt from a directory scan at start-up, least recently
used first by mtime (a hit refreshes the mtime), so a restart keeps both the data and the
eviction order.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import xxhash

from ._buffers import ALIGN, aligned_empty, is_aligned
from ._perms import DIR_MODE, FILE_MODE, ROOT_MODE, fix_mode, private_dir, private_open, tighten
from .lru import ByteLRU

log = logging.getLogger("p2pfs.diskcache")

TOUCH_INTERVAL_S = 600.0
#: What p2pfs keeps in the cache dir besides `chunks/` (tightened at scan; the chunk tree
#: during the scan's own walk) and the control socket (its mode is the server's).
OWNED = ("lock", "p2pfs.log", "manifests")
#: How long a write waits for room held by other writes in progress (each one chunk's
#: write) before it gives up and leaves the chunk uncached.
ROOM_WAIT_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskCacheStats:
    used_bytes: int
    budget_bytes: int
    chunks: int
    corrupt_dropped: int  # wrong size, wrong xxh3 or not a regular file: removed
    read_errors: int      # could not be read (OSError other than ENOENT): dropped
    raced: int            # vanished between lookup and read (evicted meanwhile): a miss
    evicted: int
    write_errors: int


class _Entry(NamedTuple):
    xxh: str
    gen: int  # tells this entry from a later one of the same digest


class _Located(NamedTuple):
    path: Path
    entry: _Entry
    size: int


class _NotRegular(Exception):
    pass


class DiskCache:
    def __init__(self, directory: Path, budget: int) -> None:
        self.dir = Path(directory)
        self.chunk_dir = self.dir / "chunks"
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a reservation ends
        self._lru: ByteLRU[str] = ByteLRU(budget)
        self._entries: dict[str, _Entry] = {}
        self._gen = itertools.count()
        self._corrupt = 0
        self._read_errors = 0
        self._raced = 0
        self._evicted = 0
        self._write_errors = 0
        self._touched: dict[str, float] = {}
        self._warned: set[str] = set()
        #: Read chunk files with O_DIRECT: no page-cache copy (the daemon keeps its own
        #: memory LRU and the kernel caches the FUSE file), saving CPU on warm reads.
        self.direct_io = True

    # -- start-up -------------------------------------------------------------------------
    def scan(self) -> None:
        """Rebuild the index from disk; remove temp files and anything we did not write;
        give every entry of the cache dir its private mode, logging how many had another."""
        private_dir(self.dir, ROOT_MODE)
        private_dir(self.chunk_dir)
        fixed = tighten(self.dir, OWNED)
        fixed += fix_mode(self.chunk_dir, os.lstat(self.chunk_dir), DIR_MODE)
        found: list[tuple[int, str, str, int]] = []
        for sub in os.scandir(self.chunk_dir):
            try:
                st = sub.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                fixed += fix_mode(sub.path, st, FILE_MODE)
            if not stat.S_ISDIR(st.st_mode):
                continue
            fixed += fix_mode(sub.path, st, DIR_MODE)
            for f in os.scandir(sub.path):
                name = f.name
                digest, _, xxh = name.partition(".")
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (name.startswith(".tmp") or len(digest) != 64 or len(xxh) != 16
                        or digest[:2] != sub.name or not stat.S_ISREG(st.st_mode)):
                    _remove(Path(f.path))
                    continue
                fixed += fix_mode(f.path, st, FILE_MODE)
                found.append((st.st_mtime_ns, digest, xxh, st.st_size))
        if fixed:
            log.warning("disk cache %s: set the modes of %d entries to 0700 (directories) and "
                        "0600 (files), so that other users cannot read the cache", self.dir, fixed)
        found.sort()
        with self._lock:
            for _, digest, xxh, size in found:
                self._lru.add(digest, size)
                self._entries[digest] = _Entry(xxh, next(self._gen))
            # The budget may have shrunk since the last run.
            doomed = [self._forget_locked(v) for v in self._lru.evict()]
        _remove_all(doomed)

    # -- queries --------------------------------------------------------------------------
    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._lru

    def may_hold(self, digest: str) -> bool:
        """A hint without the lock, for the trio thread (a write may hold the lock across
        its I/O): False means absent at this moment; True may still miss on reading, which
        `read_into` answers with False."""
        return digest in self._entries

    def stats(self) -> DiskCacheStats:
        with self._lock:
            return DiskCacheStats(
                used_bytes=self._lru.used,
                budget_bytes=self._lru.budget,
                chunks=len(self._lru),
                corrupt_dropped=self._corrupt,
                read_errors=self._read_errors,
                raced=self._raced,
                evicted=self._evicted,
                write_errors=self._write_errors,
            )

    def _path(self, digest: str, xxh: str) -> Path:
        return self.chunk_dir / digest[:2] / f"{digest}.{xxh}"

    # -- read -----------------------------------------------------------------------------
    def read(self, digest: str) -> memoryview | None:
        """The chunk's bytes (a page-aligned buffer), or None if absent, vanished,
        unreadable or corrupt (`stats` counts which)."""
        found = self._locate(digest)
        if found is None:
            return None
        buf = aligned_empty(found.size)
        return buf if self._load(digest, found, buf) else None

    def read_into(self, digest: str, dest: memoryview) -> bool:
        """Read the chunk into `dest` (exactly its size, e.g. a caller's shared memory);
        False if absent, vanished, unreadable or corrupt (a file of another size than
        `dest` is corrupt: dropped and counted, like one whose bytes fail xxh3)."""
        found = self._locate(digest)
        if found is None:
            return False
        if found.size != len(dest):  # a digest names one size: the file is damaged
            self._drop(digest, found, "corrupt", f"{found.size} bytes, the chunk has {len(dest)}")
            return False
        return self._load(digest, found, dest)

    def _locate(self, digest: str) -> _Located | None:
        with self._lock:
            entry = self._entries.get(digest)
            size = self._lru.size(digest)
            if entry is None or size is None:
                return None
            self._lru.touch(digest)
        return _Located(self._path(digest, entry.xxh), entry, size)

    def _load(self, digest: str, found: _Located, dest: memoryview) -> bool:
        """Read a located chunk file into `dest` and check it."""
        try:
            ok = _read_into(found.path, dest, self.direct_io)
        except FileNotFoundError:
            self._vanished(digest, found)
            return False
        except _NotRegular as exc:
            self._drop(digest, found, "corrupt", f"not a regular file but {exc}")
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                self._drop(digest, found, "corrupt", "not a regular file but a symlink")
            else:
                self._drop(digest, found, "read_error", str(exc))
            return False
        if not ok:
            self._drop(digest, found, "corrupt", "wrong size")
            return False
        if xxhash.xxh3_64_hexdigest(dest) != found.entry.xxh:
            self._drop(digest, found, "corrupt", "wrong xxh3")
            return False
        self._refresh_mtime(digest, found.path)
        return True

    def _vanished(self, digest: str, found: _Located) -> None:
        # Usually evicted by a writer after our lookup (then the entry is gone already, or
        # is a newer one whose file exists); a plain miss either way. If our entry is
        # still there, its file was removed behind our back: forget it.
        with self._room:
            self._raced += 1
            if self._entries.get(digest) == found.entry:
                self._lru.remove(digest)
                self._forget_locked(digest)
                self._room.notify_all()
        log.debug("disk cache: %s vanished before it could be read", found.path)

    def _drop(self, digest: str, found: _Located, kind: str, why: str) -> None:
        """Count a corrupt or unreadable chunk file, forget it and remove it, so that a bad
        path is tried once, never again."""
        with self._lock:
            if kind == "corrupt":
                self._corrupt += 1
            else:
                self._read_errors += 1
            # Only our entry: a newer one of the same digest is another file.
            doomed, held = (self._drop_locked(digest) if self._entries.get(digest) == found.entry
                            else (None, 0))
            first = kind not in self._warned
            self._warned.add(kind)
        what = "corrupt" if kind == "corrupt" else "unreadable"
        if first:
            log.warning("disk cache: dropped %s chunk file %s (%s); it will be fetched again. Further "
                        "%s files are counted in the status and logged at debug level",
                        what, found.path, why, what)
        else:
            log.debug("disk cache: dropped %s chunk file %s (%s)", what, found.path, why)
        self._remove_held([doomed], held)

    # -- write ----------------------------------------------------------------------------
    def write(self, digest: str, data: bytes | memoryview, xxh: str | None = None) -> bool:
        """Store a verified chunk, evicting first so the budget holds throughout. False if
        it could not be stored (disk full, I/O error, or bigger than the whole budget).
        Waits while writes in progress in other threads hold the room it needs.

        `xxh`: the xxh3 of the verified bytes, taken earlier. Then `data` may be memory
        someone else can change while we write (a fill client's): a file that does not
        match `xxh` fails its check on read-back and is refetched, never served."""
        size = len(data)
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            with self._room:
                if digest in self._lru:
                    self._lru.touch(digest)
                    return True
                if size > self._lru.budget:
                    return False
                if self._lru.reserve(size):
                    break
                doomed, held = self._evict_held_locked(reserve=self._lru.reserved + size)
                if not doomed:
                    # The room is held by writes and deletes in progress: wait for them.
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.debug("disk cache: no room for %s within %.0f s", digest, ROOM_WAIT_S)
                        return False
                    self._room.wait(left)
                    continue
            self._remove_held(doomed, held)  # then try again: another write may take it
        committed = False
        try:
            if xxh is None:
                xxh = xxhash.xxh3_64_hexdigest(data)
            final = self._path(digest, xxh)
            tmp = final.parent / f".tmp.{digest}.{threading.get_ident()}"
            try:
                _make_subdir(final.parent)
                _write_file(tmp, data, self.direct_io)
                os.rename(tmp, final)
            except OSError as exc:
                _remove(tmp)
                with self._lock:
                    self._write_errors += 1
                if exc.errno == errno.ENOSPC:
                    self._shrink_after_enospc(size)
                return False
            with self._room:
                # Another write of this digest may have landed meanwhile, under another
                # name if its xxh3 differed (a fill client's memory changed): ours wins,
                # and the other file goes, or it would stay on disk uncounted.
                other, held = self._drop_locked(digest)
                self._lru.commit(digest, size)
                self._entries[digest] = _Entry(xxh, next(self._gen))
                self._room.notify_all()
            committed = True
            self._remove_held([None if other == final else other], held)
            return True
        finally:
            if not committed:
                with self._room:
                    self._lru.release(size)
                    self._room.notify_all()

    def _refresh_mtime(self, digest: str, path: Path) -> None:
        # The mtime carries the LRU order across restarts. Refreshing it costs a metadata
        # write, so do it at most once per TOUCH_INTERVAL_S per chunk.
        now = time.monotonic()
        if now - self._touched.get(digest, -TOUCH_INTERVAL_S) >= TOUCH_INTERVAL_S:
            self._touched[digest] = now
            try:
                os.utime(path)
            except OSError:
                pass

    def remove(self, digest: str) -> None:
        with self._lock:
            doomed, held = self._drop_locked(digest)
        self._remove_held([doomed], held)

    def _shrink_after_enospc(self, need: int) -> None:
        # The disk filled before our budget did: free room by evicting the oldest chunks.
        with self._lock:
            doomed, held = self._evict_held_locked(limit=max(0, self._lru.used - 8 * need))
        self._remove_held(doomed, held)

    # The lock guards bookkeeping only, never file I/O (the trio thread takes it to ask
    # `digest in cache`): files are removed after it is released, their bytes held in the
    # LRU until they are gone.
    def _evict_held_locked(self, **evict_args: int) -> tuple[list[Path | None], int]:
        """Evict (ByteLRU.evict's arguments) holding the victims' bytes; return their files
        and the bytes held, for `_remove_held`."""
        before = self._lru.reserved
        victims = self._lru.evict(hold=True, **evict_args)
        self._evicted += len(victims)
        return [self._forget_locked(v) for v in victims], self._lru.reserved - before

    def _drop_locked(self, digest: str) -> tuple[Path | None, int]:
        """Drop `digest` from the index holding its bytes; its file and the bytes held."""
        held = self._lru.remove(digest, hold=True)
        return self._forget_locked(digest), held

    def _forget_locked(self, digest: str) -> Path | None:
        """The rest of the index after the LRU let `digest` go; its file, if any."""
        self._touched.pop(digest, None)
        entry = self._entries.pop(digest, None)
        return None if entry is None else self._path(digest, entry.xxh)

    def _remove_held(self, paths: list[Path | None], held: int) -> None:
        """Remove the files, then give back the bytes held for them."""
        _remove_all(paths)
        with self._room:
            self._lru.release(held)
            self._room.notify_all()


def _remove_all(paths: list[Path | None]) -> None:
    for p in paths:
        if p is not None:
            _remove(p)


def _remove(path: Path) -> None:
    """Remove whatever is at `path` (a directory too: a chunk path is ours whatever is
    there); nothing if it is gone. Failures are left for the next scan."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR, POSIX EPERM
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        log.debug("disk cache: could not remove %s", path, exc_info=True)


def _make_subdir(path: Path) -> None:
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # whatever the umask


def _read_into(path: Path, dest: memoryview, direct: bool) -> bool:
    """Fill `dest` with the whole file; False if the file's size differs; _NotRegular if it
    is no regular file (opened O_NONBLOCK, so a FIFO cannot block us, and O_NOFOLLOW). The
    aligned bulk is read with O_DIRECT when `dest` is page-aligned (no page-cache copy), the
    rest, or all of it where the filesystem refuses O_DIRECT (tmpfs, some FUSE), normally,
    all through one descriptor."""
    n = len(dest)
    bulk = n - n % ALIGN
    if not (direct and bulk and is_aligned(dest)):
        bulk = 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = _open_direct(path, flags) if bulk else None
    if fd is None:
        bulk = 0
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(_KINDS.get(stat.S_IFMT(st.st_mode), "a special file"))
        if st.st_size != n:
            return False
        done = 0
        if bulk:
            try:
                done = _pread_all(fd, dest[:bulk], 0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if done < n:
            if bulk:
                _clear_direct(fd)
            done += _pread_all(fd, dest[done:], done)
        return done == n
    finally:
        os.close(fd)


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _open_direct(path: Path, flags: int) -> int | None:
    """Open with O_DIRECT; None where the filesystem refuses it."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None


def _clear_direct(fd: int) -> None:
    # The unaligned tail (or a retry after EINVAL) goes through the page cache.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _pread_all(fd: int, buf: memoryview, offset: int) -> int:
    got = 0
    while got < len(buf):
        k = os.preadv(fd, [buf[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


def _write_file(path: Path, data: bytes | memoryview, direct: bool) -> None:
    """Write `data` as the whole file, mode 0600. From a page-aligned buffer the aligned
    bulk goes with O_DIRECT: measured here, buffered writes of fresh chunks cost ~2.2 s of
    CPU per GiB (new page-cache pages, a copy, the flush) against ~0.2 s with O_DIRECT, and
    a cold load is CPU-bound. The unaligned tail, if any, is written normally."""
    view = memoryview(data).cast("B")
    n = len(view)
    bulk = n - n % ALIGN
    if not (direct and bulk and is_aligned(view)):
        bulk = 0
    flags = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW
    fd = None
    if bulk:
        try:
            fd = private_open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            bulk = 0
    if fd is None:
        fd = private_open(path, flags)
    try:
        done = 0
        if bulk:
            while done < bulk:
                done += os.pwritev(fd, [view[done:bulk]], done)
            if n > bulk:
                _clear_direct(fd)
        while done < n:
            done += os.pwritev(fd, [view[done:]], done)
    finally:
        os.close(fd)
