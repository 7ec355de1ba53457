"""Read planning: which chunks cover a byte range, and how to fetch them in few requests.

Pure functions over manifest entries; no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from .manifest import ChunkRef, Entry

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Spot:
    """Where a chunk sits in the local copy of a file (the disk cache keeps files whole,
    docs/FORMAT.md "Disk cache"): the file's content id, the chunk's offset in the file,
    the file's size."""

    file: str
    at: int
    fsize: int


@dataclass(frozen=True, slots=True)
class ChunkLoc:
    """A chunk, the object key of the blob that holds it, and, where the chunk is read as
    part of a file, its spot in that file (None: a chunk asked for alone, e.g. by a peer)."""

    key: str
    ref: ChunkRef
    spot: Spot | None = None

    @property
    def digest(self) -> str:
        return self.ref.digest


def file_id(entry: Entry) -> str:
    """A file's content id: the sha256 of its chunk list (digests and sizes, in order; the
    chunk hash named when it is not sha256). Two files with the same bytes cut into the same
    chunks, digested alike, share it, and so their local copy, across models, revisions and
    image layers; any other difference gives another id."""
    algo = entry.chunks[0].hash if entry.chunks else "sha256"
    h = hashlib.sha256(b"p2pfs-file 1\n" if algo == "sha256" else f"p2pfs-file 1 {algo}\n".encode())
    for c in entry.chunks:
        h.update(f"{c.digest} {c.size}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Request:
    """One ranged GET that returns the stored bytes of `locs`, back to back."""

    key: str
    offset: int
    length: int
    locs: tuple[ChunkLoc, ...]


def chunk_span(entry: Entry, offset: int, size: int) -> range:
    """Indices of the chunks of `entry` that hold bytes [offset, offset+size), clipped to EOF."""
    end = min(offset + size, entry.size)
    if offset >= end or not entry.chunks:
        return range(0)
    return range(entry.chunk_index(offset), entry.chunk_index(end - 1) + 1)


def adjacent(a: ChunkLoc, b: ChunkLoc) -> bool:
    """Whether `b` is stored right after `a` in the same blob (one ranged GET reads both)."""
    return near(a, b, 0)


def near(a: ChunkLoc, b: ChunkLoc, max_gap: int) -> bool:
    """Whether `b` is stored after `a` in the same blob with at most `max_gap` bytes
    between them (one ranged GET reads both and the gap)."""
    gap = b.ref.offset - (a.ref.offset + a.ref.length)
    return a.key == b.key and a.ref.blob == b.ref.blob and 0 <= gap <= max_gap


def coalesce_items(items: Sequence[T], max_request: int, loc: Callable[[T], ChunkLoc],
                   together: Callable[[T, T], bool] = lambda a, b: True,
                   max_gap: int = 0) -> list[list[T]]:
    """The one coalescing planner: group items whose chunks lie in order in one blob, back
    to back or at most `max_gap` stored bytes apart (and for which `together(previous,
    item)` holds, e.g. adjacent in a destination), into runs of at most `max_request`
    stored bytes from the first chunk's start to the last one's end; a single chunk bigger
    than that still gets its own run. Order is kept."""
    runs: list[list[T]] = []
    for item in items:
        if runs:
            run = runs[-1]
            first, last, this = loc(run[0]).ref, loc(run[-1]), loc(item)
            if (near(last, this, max_gap) and together(run[-1], item)
                    and this.ref.offset + this.ref.length - first.offset <= max_request):
                run.append(item)
                continue
        runs.append([item])
    return runs


def coalesce(locs: Sequence[ChunkLoc], max_request: int, max_gap: int = 0) -> list[Request]:
    """Chunks grouped into ranged GETs of at most `max_request` bytes (coalesce_items)."""
    out: list[Request] = []
    for run in coalesce_items(locs, max_request, lambda x: x, max_gap=max_gap):
        first = run[0].ref
        length = run[-1].ref.offset + run[-1].ref.length - first.offset
        out.append(Request(run[0].key, first.offset, length, tuple(run)))
    return out


def overlaps(entry: Entry, span: range, offset: int, size: int) -> list[int]:
    """How many bytes of [offset, offset+size) each chunk of `span` holds (what a reply
    uses of it, for counting bytes by source)."""
    end = min(offset + size, entry.size)
    return [max(0, min(end, entry.starts[i] + entry.chunks[i].size) - max(offset, entry.starts[i]))
            for i in span]


def slice_reply(entry: Entry, span: range, chunks: Sequence[bytes], offset: int,
                size: int) -> bytes | memoryview:
    """Assemble the bytes [offset, offset+size) of `entry` from the chunks in `span`.
    Within one chunk this is a zero-copy view (pyfuse3 replies from any buffer)."""
    end = min(offset + size, entry.size)
    if len(span) == 1:
        start = entry.starts[span[0]]
        return memoryview(chunks[0])[offset - start : end - start]
    parts = []
    for idx, data in zip(span, chunks):
        start = entry.starts[idx]
        lo = max(offset, start) - start
        hi = min(end, start + len(data)) - start
        parts.append(memoryview(data)[lo:hi])
    return b"".join(parts)
