"""Chunk digests per core: sha256 (hashlib, SHA-NI where the CPU has it) against BLAKE3
(PyPI `blake3`, one thread per chunk, as the daemon hashes), and xxh3 (the disk cache's
check) for scale, at the chunk sizes p2pfs uses (image layers 256 KiB, models 8 MiB).

    .venv/bin/python bench/bench_hashes.py [--rounds 5] [--json out.json]

Each round hashes every size with every hash in turn (interleaved, so a noisy VM slows
all alike) and on 1 and 2 threads at once (both hashes release the GIL); the medians are
printed in GB/s and s/GiB. Pure CPU: no I/O.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import threading
import time

import blake3
import xxhash

HASHES = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake3": lambda b: blake3.blake3(b).digest(),
    "xxh3": lambda b: xxhash.xxh3_64(b).digest(),
}
SIZES = {"256KiB": 256 << 10, "8MiB": 8 << 20}
VOLUME = 256 << 20  # bytes hashed per thread per measurement


def rate(fn, data: bytes, threads: int) -> float:
    """GB/s of `threads` threads each hashing VOLUME bytes of `data`-sized chunks."""
    n = max(1, VOLUME // len(data))

    def work() -> None:
        for _ in range(n):
            fn(data)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return threads * n * len(data) / (time.perf_counter() - t0) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the raw rates here")
    args = ap.parse_args()
    data = {name: os.urandom(size) for name, size in SIZES.items()}
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for size in SIZES:
            for threads in (1, 2):
                for h, fn in HASHES.items():
                    runs.setdefault(f"{h} {size} x{threads}", []).append(
                        rate(fn, data[size], threads))
    print(f"{'hash, chunk, threads':<24} {'GB/s':>7} {'s/GiB':>7}   (median of {args.rounds})")
    for key, rs in runs.items():
        med = statistics.median(rs)
        print(f"{key:<24} {med:7.2f} {(1 << 30) / 1e9 / med:7.3f}")
    for size in SIZES:
        a = statistics.median(runs[f"sha256 {size} x1"])
        b = statistics.median(runs[f"blake3 {size} x1"])
        print(f"blake3 / sha256 at {size}, one core: {b / a:.2f}x the rate")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
