"""Read planning: which chunks cover a byte range, and how to fetch them in few requests.

Pure functions over manifest entries; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .manifest import ChunkRef, Entry


@dataclass(frozen=True, slots=True)
class ChunkLoc:
    """A chunk and the object key of the blob that holds it."""

    key: str
    ref: ChunkRef

    @property
    def digest(self) -> str:
        return self.ref.sha256


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


def coalesce(locs: Sequence[ChunkLoc], max_request: int) -> list[Request]:
    """Group chunks that lie back to back in one blob into requests of at most `max_request`
    bytes (a single chunk bigger than that still gets its own request). Order is kept."""
    out: list[Request] = []
    run: list[ChunkLoc] = []

    def flush() -> None:
        if run:
            first = run[0].ref
            length = run[-1].ref.offset + run[-1].ref.length - first.offset
            out.append(Request(run[0].key, first.offset, length, tuple(run)))
            run.clear()

    for loc in locs:
        if run:
            last = run[-1]
            adjacent = loc.key == last.key and loc.ref.blob == last.ref.blob and (
                loc.ref.offset == last.ref.offset + last.ref.length
            )
            fits = loc.ref.offset + loc.ref.length - run[0].ref.offset <= max_request
            if not (adjacent and fits):
                flush()
        run.append(loc)
    flush()
    return out


def split_response(req: Request, data: bytes | memoryview) -> list[memoryview]:
    """Cut the body of `req` into the stored bytes of each of its chunks."""
    if len(data) != req.length:
        raise ValueError(f"expected {req.length} bytes for {req.key}@{req.offset}, got {len(data)}")
    view = memoryview(data)
    return [
        view[loc.ref.offset - req.offset : loc.ref.offset - req.offset + loc.ref.length]
        for loc in req.locs
    ]


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
