"""Read part of a file the way one kind of program does, in a child process the fault tests
can time out and kill: a read that hangs must fail the test, not wedge it.

    python _reader.py PATH MODE OFFSET LENGTH [COPY]  (LENGTH -1: to the end of the file)

MODE: `buffered` (read(2) through the page cache, what cat does), `direct` (O_DIRECT),
`mmap` (page faults; an unservable page kills us with SIGBUS, which the caller sees as
the return code). With COPY, what was read is also written to that file. Prints one JSON line: {"ok", "errno", "sha256", "n", "t0", "t1"};
t0/t1 are CLOCK_MONOTONIC, comparable with the caller's time.monotonic().
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time


def main() -> None:
    path, mode, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    copy = open(sys.argv[5], "wb") if len(sys.argv) > 5 else None
    h = hashlib.sha256()

    def took(block) -> None:
        nonlocal n
        h.update(block)
        n += len(block)
        if copy is not None:
            copy.write(block)

    n = 0
    t0 = time.monotonic()
    # Said before touching the file: if we die of SIGBUS the caller still knows when we began.
    print(json.dumps({"t0": t0}), flush=True)
    try:
        if mode == "mmap":
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                end = size if length < 0 else min(size, offset + length)
                if end > offset:
                    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                        step = 1 << 20
                        for pos in range(offset, end, step):
                            took(m[pos:min(end, pos + step)])
            finally:
                os.close(fd)
        else:
            flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
            fd = os.open(path, flags)
            try:
                buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
                view = memoryview(buf)
                pos = offset
                while length < 0 or n < length:
                    want = len(view) if length < 0 else min(len(view), length - n)
                    k = os.preadv(fd, [view[:want]], pos)
                    if k == 0:
                        break
                    took(view[:k])
                    pos += k
            finally:
                os.close(fd)
    except OSError as exc:
        print(json.dumps({"ok": False, "errno": exc.errno, "n": n, "t0": t0, "t1": time.monotonic()}))
        return
    print(json.dumps({"ok": True, "errno": 0, "sha256": h.hexdigest(), "n": n, "t0": t0,
                      "t1": time.monotonic()}))


if __name__ == "__main__":
    main()
