"""Read planning, pure: which byte ranges to read, in which order, and how far a file is done.

Reads go in file order (shard after shard), in segments of at most `segment_size` bytes:
large enough that a pread or a host-to-device copy runs at full speed, small enough that a
ring of a few staging buffers keeps several in flight. File order matters twice: the disk
and p2pfs's read-ahead both reward it, and a streaming consumer can take tensors as soon as
the contiguous prefix of the file holding them is done.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

@dataclass(frozen=True, slots=True)
class Segment:
    file: int      # index of the file in the checkpoint
    offset: int    # into the data section
    length: int


def plan_reads(data_sizes: list[int], segment_size: int) -> list[Segment]:
    """Segments covering every file's data section, in file order."""
    if segment_size <= 0:
        raise ValueError("segment_size must be positive")
    return [Segment(i, off, min(segment_size, size - off))
            for i, size in enumerate(data_sizes)
            for off in range(0, size, segment_size)]


def plan_aligned(data_sizes: list[int], data_starts: list[int],
                 segment_sizes: list[int]) -> list[Segment]:
    """Like `plan_reads`, but every segment ends where the *file* offset is a multiple of its
    file's segment size (a p2pfs chunk boundary), so each request covers whole chunks."""
    out: list[Segment] = []
    for i, (size, start, seg) in enumerate(zip(data_sizes, data_starts, segment_sizes)):
        if seg <= 0:
            raise ValueError("segment_size must be positive")
        off = 0
        while off < size:
            boundary = ((start + off) // seg + 1) * seg  # next multiple, in file offsets
            n = min(size - off, boundary - start - off)
            out.append(Segment(i, off, n))
            off += n
    return out


@dataclass
class Watermark:
    """How much of one file's data section is done: the end of the longest prefix whose
    segments have all completed, however out of order they completed."""

    done_to: int = 0
    _pending: list[tuple[int, int]] = field(default_factory=list)  # sorted (offset, end)

    def complete(self, offset: int, length: int) -> int:
        bisect.insort(self._pending, (offset, offset + length))
        while self._pending and self._pending[0][0] <= self.done_to:
            self.done_to = max(self.done_to, self._pending.pop(0)[1])
        return self.done_to
