"""The read pipeline: a few threads take segments in file order and hand each to a sink.

    segments (file order) --> N reader threads --> sink.process(segment)
                                                     ├─ MapSink:    madvise-populate a mapping
                                                     ├─ DirectSink: pread into the destination
                                                     └─ StagedSink: pread into a ring slot, then
                                                                    copy slot -> destination
                                                                    (CUDA: async on a copy
                                                                    stream, an event per slot)

Invariants:
- Threads take segments strictly in plan order (one lock around the cursor), so at any time
  the reads in flight are the next N segments: the disk and p2pfs see a sequential stream.
- Host memory is bounded by the sink (the ring), never by the file: a staged sink owns
  `slots` buffers; a reader that finds none free waits for one (and, on CUDA, for the copy
  out of it to finish: the slot's event).
- A streaming consumer bounds how far readers run ahead of it (`window` bytes); readers wait
  on a condition variable rather than racing ahead and growing memory.
- The first error stops every thread and is re-raised in the consumer; `close()` stops the
  readers and joins them: no thread outlives its Pipeline.
- `inline`: no reader threads at all. The consumer's own thread processes segments, in plan
  order, when `wait_until` or `join` needs them. For a small local load this is faster,
  warm and cold: starting and joining the threads costs more than the parallel requests
  save (docs/GPULOAD.md, "Small files").
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from ._plan import Segment, Watermark


class Sink(Protocol):
    def process(self, seg: Segment) -> None:
        """Make segment `seg` available at its destination (may block; called from readers)."""

    def flush(self) -> None:
        """Wait until every processed segment is usable by the consumer."""


class Pipeline:
    def __init__(self, segments: Sequence[Segment], sink: Sink, *, threads: int,
                 sizes: Sequence[int], window: int | None = None, inline: bool = False) -> None:
        """`sizes`: every file's data-section size; `window`: how many bytes readers may
        run ahead of a streaming consumer (None: no bound, for whole-checkpoint loads);
        `inline`: process segments in the consumer's thread, `threads` unused."""
        self.segments = segments
        self.sink = sink
        self.inline = inline
        self.nthreads = 0 if inline else max(1, threads)
        self.window = window
        self.marks = [Watermark() for _ in sizes]
        self._base = [0, *itertools.accumulate(sizes)][:len(sizes)]
        self._cursor = 0
        self._consumer = 0  # position (across files) the consumer has reached
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._finished = 0
        self._threads: list[threading.Thread] = []

    # -- readers ------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        for i in range(min(self.nthreads, len(self.segments))):
            t = threading.Thread(target=self._reader, name=f"gpuload-read-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _next(self) -> Segment | None:
        with self._cond:
            while True:
                if self._stop or self._error is not None:
                    return None
                if self._cursor >= len(self.segments):
                    return None
                seg = self.segments[self._cursor]
                if self._may_start(seg):
                    self._cursor += 1
                    return seg
                self._cond.wait()

    def _may_start(self, seg: Segment) -> bool:
        # Positions count across shards (file i starts where file i-1's data ended), so the
        # window carries over from one shard into the next.
        return self.window is None or self._base[seg.file] + seg.offset < self._consumer + self.window

    def _reader(self) -> None:
        try:
            while (seg := self._next()) is not None:
                self.sink.process(seg)
                with self._cond:
                    self.marks[seg.file].complete(seg.offset, seg.length)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, not lost
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._finished += 1
                self._cond.notify_all()

    # -- consumer -----------------------------------------------------------------------
    def wait_until(self, file: int, end: int) -> None:
        """Block until file `file`'s data section is done up to `end`; re-raise a reader's
        error. Also tells readers the consumer got this far (the window moves)."""
        if self.inline:
            self._process_inline(file, end)
            return
        with self._cond:
            self._consumer = max(self._consumer, self._base[file] + end)
            self._cond.notify_all()
            while self.marks[file].done_to < end:
                if self._error is not None:
                    raise self._error
                if self._finished == len(self._threads) and self.marks[file].done_to < end:
                    raise RuntimeError("gpuload pipeline ended before its plan was done")
                self._cond.wait()

    def _process_inline(self, file: int | None, end: int = 0) -> None:
        """Process segments in order until file `file` is done to `end` (None: all of them).
        Runs in the consumer's thread; a sink error propagates from here, and is raised
        again by any later call (its segment is not retried)."""
        if self._error is not None:
            raise self._error
        while file is None or self.marks[file].done_to < end:
            if self._cursor >= len(self.segments):
                if file is None:
                    return
                raise RuntimeError("gpuload pipeline ended before its plan was done")
            seg = self.segments[self._cursor]
            self._cursor += 1
            try:
                self.sink.process(seg)
            except BaseException as exc:
                self._error = exc
                raise
            self.marks[seg.file].complete(seg.offset, seg.length)

    def join(self) -> None:
        """Wait for every segment; re-raise the first error."""
        if self.inline:
            self._process_inline(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error
        self.sink.flush()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()


class Ring:
    """A fixed set of staging buffers. `acquire` blocks until one is free and the copy out
    of it has finished (`wait` is the slot's event on CUDA, a no-op on CPU)."""

    def __init__(self, buffers: Sequence[object], wait: Callable[[int], None]) -> None:
        self.buffers = list(buffers)
        self._wait = wait
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self.buffers)):
            self._free.put(i)

    def acquire(self) -> int:
        i = self._free.get()
        self._wait(i)
        return i

    def release(self, i: int) -> None:
        self._free.put(i)
