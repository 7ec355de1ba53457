"""FillSink: files on a p2pfs mount, written into our memory by the p2pfs daemon.

Instead of reading through FUSE, each file gets a `p2pfs.fill.FillClient`: a memfd of the
file's size that the daemon maps too. A segment is one `fill` request; the daemon receives
the chunks from the origin (or reads them from its disk cache) straight into that memory,
verifies them there and writes them to its cache from there. Tensors are views of the memfd
(like MapSink's views of a file map, `base` = data_start), which is ours alone after the
load: writing to a tensor changes neither the file nor the daemon's cache.

Before asking for a segment, the reader thread faults its pages in (MADV_POPULATE_WRITE):
the memory is then charged to us (the loader), not to the daemon's cgroup, and populating
is cheaper than faulting page by page (2 GiB of fresh memfd pages here: 1.9 s vs 2.5 s by
first writes; end to end the difference was within noise).

Segments are aligned to the file's chunk size (`plan_aligned`), so each request covers
whole chunks and takes the daemon's zero-copy path; the first segment of a file starts at
file offset 0, so the chunk holding the header is whole too.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Sequence

import torch

from ._io import MADV_POPULATE_WRITE, Shard, address, madvise
from ._plan import Segment
from .errors import ReadError

log = logging.getLogger("gpuload.p2pfs")


def open_clients(shards: Sequence[Shard]) -> list | None:
    """A fill session per shard, or None (with the reason logged) when any shard cannot
    have one: not on p2pfs, an older daemon, no memfd support. The caller then reads
    through FUSE, which always works."""
    from p2pfs.errors import P2PFSError
    from p2pfs.fill import FillClient

    clients = []
    try:
        for s in shards:
            clients.append(FillClient(s.path))
            clients[-1].release()  # reopened by the first fill: one session per file being filled
    except (P2PFSError, OSError, ValueError) as exc:  # ValueError: a garbled answer
        log.info("p2pfs fill unavailable, reading through the mount: %s", exc)
        for c in clients:
            c.close()
            c.memory.close()
        return None
    return clients


class FillSink:
    def __init__(self, shards: Sequence[Shard], clients: Sequence) -> None:
        self.shards = shards
        self.clients = clients
        self._addrs = [address(c.memory) for c in clients]
        self._populate = True
        self._filled = [0] * len(clients)  # bytes asked per file; its session ends when all are in
        self._lock = threading.Lock()
        self._fell_back = False

    def chunk_sizes(self, default: int) -> list[int]:
        return [c.chunk_size or default for c in self.clients]

    def buffer(self, file: int) -> torch.Tensor:
        """The whole file as uint8 (views need `base` = data_start)."""
        return torch.frombuffer(self.clients[file].memory, dtype=torch.uint8)

    def process(self, seg: Segment) -> None:
        start = self.shards[seg.file].header.data_start
        lo = 0 if seg.offset == 0 else start + seg.offset
        hi = start + seg.offset + seg.length
        if self._populate:
            page = lo - lo % mmap.PAGESIZE
            if madvise(self._addrs[seg.file] + page, hi - page, MADV_POPULATE_WRITE):
                self._populate = False  # an older kernel: the daemon's writes fault them in
        from p2pfs.errors import P2PFSError
        from p2pfs.fill import SessionUnavailable

        try:
            self.clients[seg.file].fill(lo, hi - lo)
        except SessionUnavailable as exc:
            # The daemon is at its connection limit (more files in flight than it takes
            # sessions): these bytes come through the mount instead, into the same memory.
            if not self._fell_back:
                self._fell_back = True
                log.info("%s; reading such segments through the mount", exc)
            self._read_through_mount(seg.file, lo, hi)
        except P2PFSError as exc:
            raise ReadError(str(exc)) from None
        with self._lock:
            self._filled[seg.file] += hi - lo
            done = self._filled[seg.file] >= self.shards[seg.file].header.file_size
        if done:
            self.clients[seg.file].release()

    def _read_through_mount(self, file: int, lo: int, hi: int) -> None:
        view = memoryview(self.clients[file].memory)[lo:hi]
        fd, got = self.shards[file].fd, 0
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:]], lo + got)
                if n == 0:
                    raise ReadError(f"{self.shards[file].path}: file ended at {lo + got}")
                got += n
        except OSError as exc:
            raise ReadError(f"{self.shards[file].path}: {exc.strerror} at {lo + got}") from None
        finally:
            view.release()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """End the sessions; the memory stays mapped for the tensors that view it."""
        for c in self.clients:
            c.close()
