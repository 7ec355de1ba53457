"""File descriptors that clients pass with SCM_RIGHTS: received within bounds, checked,
and closed, never on the trio thread.

Why not on the trio thread: close() of a file on a FUSE mount sends FLUSH to that mount's
daemon and waits, uninterruptibly, for the answer. If the file is on our own mount, the
thread that would answer is the one blocked in close(): the daemon hangs in D state and
not even SIGKILL ends it (issue 12). The same holds for fstat, fstatfs and mmap of such a
file. So the trio thread never makes a syscall on a received descriptor: `FdCloser`
closes them on a thread of its own, and `map_fill_memory` inspects and maps in a worker
thread. Descriptors we did not make room for are discarded by the kernel itself
(MSG_CTRUNC), which drops its reference without FLUSH.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import queue
import socket
import stat
from typing import Iterable

import trio

from ..errors import ProtocolError

log = logging.getLogger("p2pfs.control")
_INT = array.array("i").itemsize


def ancillary_space(nfds: int) -> int:
    """recvmsg's ancbufsize for at most `nfds` descriptors. CMSG_LEN, not CMSG_SPACE:
    the kernel fills whatever fits, and CMSG_SPACE(4) has room for two."""
    return socket.CMSG_LEN(nfds * _INT) if nfds > 0 else 0


def unpack_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _INT])
    return list(fds)


class FdCloser:
    """Closes received descriptors on one thread of its own (never the trio thread).

    `close_soon` never blocks and never fails, so it is safe in `finally` blocks under
    cancellation. A close may block for long (a file on a hung FUSE or network mount); the
    ones queued behind it wait, and `backlogged` tells the server to stop taking new
    descriptors meanwhile, so the backlog stays bounded by the connections in progress.
    """

    def __init__(self, *, backlog: int = 64) -> None:
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._backlog = backlog
        self.closed = 0

    def close_soon(self, fds: Iterable[int]) -> None:
        for fd in fds:
            self._queue.put(fd)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def backlogged(self) -> bool:
        return self.pending >= self._backlog

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close descriptors until cancelled. The thread is abandoned on cancellation (a
        close may never return); it ends at the stop marker queued after what is left."""
        task_status.started()
        try:
            await trio.to_thread.run_sync(self._loop, thread_name="p2pfs-fd-closer",
                                          abandon_on_cancel=True,
                                          limiter=trio.CapacityLimiter(1))
        finally:
            self._queue.put(None)

    def _loop(self) -> None:
        while (fd := self._queue.get()) is not None:
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing a received fd %d: %s", fd, exc)
            self.closed += 1


def map_fill_memory(fd: int) -> mmap.mmap:
    """Map the memory a fill client passed; call in a worker thread. It must be a memfd
    (a shmem file: F_GET_SEALS works on nothing else, and asks no file system) sealed
    against shrinking: if the client could truncate it under us, our writes would fault
    (SIGBUS) and end the daemon. Anything else, files on FUSE mounts included, is a
    ProtocolError."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ProtocolError(
            f"fill memory must be a memfd (memfd_create with MFD_ALLOW_SEALING), got "
            f"{_describe(fd)}") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError("fill memory must be a memfd sealed with F_SEAL_SHRINK "
                            "(memfd_create(MFD_ALLOW_SEALING), ftruncate, F_ADD_SEALS)")
    st = os.fstat(fd)  # a shmem file: answered by the kernel, no file system daemon
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("fill memory must be a memfd (a regular shmem file)")
    if st.st_size == 0:
        raise ProtocolError("fill memory is empty")
    return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _describe(fd: int) -> str:
    """What a descriptor refers to, from /proc (the kernel's own name for it: no request
    to a file system)."""
    try:
        return repr(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return "something else"
