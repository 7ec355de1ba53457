"""Where a cold load's time goes beyond the S3 limit: the receive, or the memory it lands in.

    sudo .venv/bin/python bench/probe_receive_memory.py [--rounds 3] [--size-gib 1]

One object on a local SeaweedFS, read whole as 16 parallel 8 MiB ranged GETs by four
clients, interleaved in every round (page cache dropped and 2 s settle before each):

  limit           bench_p2pfs.s3_limit: aiobotocore, each body read into a fresh bytes
                  object and dropped (glibc reuses the memory: the limit never holds the
                  object), the issue's anchor
  p2pfs-reused    p2pfs's RangeClient (recv_into), each GET into one of 16 reused buffers
  p2pfs-fresh     the same, every GET into its place in one fresh memfd mapping of the
                  whole object (what `fill` does: the loader's memory)
  p2pfs-prefaulted  the same memfd, its pages faulted in (MADV_POPULATE_WRITE) before the
                  clock starts: the receive alone, into memory that is already there

Printed per client: seconds, and CPU seconds per GiB of the client process and of
SeaweedFS, medians over the rounds. The difference between p2pfs-fresh and
p2pfs-prefaulted is the first touch of the destination, which a loader that keeps the
object in memory cannot avoid and the limit never pays. Needs root (drop_caches) and weed.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import trio  # noqa: E402

from bench_gpuload_s3 import CREDS, drop_caches, proc_cpu  # noqa: E402
from bench_p2pfs import s3_limit  # noqa: E402
from gpuload._io import MADV_POPULATE_WRITE, address, madvise  # noqa: E402
from p2pfs.origin._http import RangeClient  # noqa: E402
from p2pfs.seaweed import SeaweedServer  # noqa: E402

MiB = 1 << 20
BUCKET, KEY = "bench", "probe/object.bin"
REQUEST, CONCURRENCY = 8 * MiB, 16
CLIENTS = ("limit", "p2pfs-reused", "p2pfs-fresh", "p2pfs-prefaulted")


async def _s3(endpoint: str, fn):
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint) as c:
        return await fn(c)


def upload(endpoint: str, size: int) -> str:
    """Put the object (random bytes) and return a presigned GET URL for it."""
    async def put(c):
        await c.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size))
        return await c.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY},
                                              ExpiresIn=3600)
    return asyncio.run(_s3(endpoint, put))


def fresh_memory(size: int, prefault: bool) -> tuple[mmap.mmap, memoryview]:
    fd = os.memfd_create("probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if prefault and madvise(address(mm), size, MADV_POPULATE_WRITE):
        raise OSError("MADV_POPULATE_WRITE failed (Linux >= 5.14 needed)")
    return mm, memoryview(mm)


def range_client(url: str, size: int, client: str) -> tuple[float, float]:
    """(seconds, process CPU seconds) to receive the object with p2pfs's RangeClient into
    the client's memory; making (and prefaulting) that memory is outside both."""
    mm = view = None
    if client != "p2pfs-reused":
        mm, view = fresh_memory(size, prefault=client == "p2pfs-prefaulted")
    reused = [memoryview(bytearray(REQUEST)) for _ in range(CONCURRENCY)]

    async def main() -> tuple[float, float]:
        rc = RangeClient(connect_timeout=5, request_timeout=120)
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(off: int) -> None:
            n = min(REQUEST, size - off)
            async with limiter:
                if view is not None:
                    await rc.get_range_into(url, off, view[off:off + n], what=KEY, timeout=120)
                else:
                    buf = reused.pop()
                    try:
                        await rc.get_range_into(url, off, buf[:n], what=KEY, timeout=120)
                    finally:
                        reused.append(buf)

        t0, c0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for off in range(0, size, REQUEST):
                nursery.start_soon(one, off)
        return time.perf_counter() - t0, time.process_time() - c0

    try:
        return trio.run(main)
    finally:
        if view is not None:
            view.release()
            mm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--settle", type=float, default=2.0)
    args = ap.parse_args()
    size = int(args.size_gib * 2**30) // REQUEST * REQUEST
    gib = size / 2**30
    os.environ.update(CREDS)
    res: dict[str, list[tuple[float, float, float]]] = {c: [] for c in CLIENTS}
    with tempfile.TemporaryDirectory(prefix="probe-recv-", dir="/var/tmp") as work:
        sw = SeaweedServer(Path(work) / "weed").start()
        try:
            sw.create_bucket(BUCKET)
            url = upload(sw.endpoint, size)
            for rnd in range(args.rounds):
                for client in CLIENTS:
                    drop_caches(args.settle)
                    w0 = proc_cpu(sw.proc.pid)
                    if client == "limit":
                        c0 = time.process_time()
                        dt = asyncio.run(s3_limit(sw.endpoint, BUCKET, KEY, size))
                        cpu = time.process_time() - c0
                    else:
                        dt, cpu = range_client(url, size, client)
                    w = proc_cpu(sw.proc.pid) - w0
                    res[client].append((dt, cpu / gib, w / gib))
                    print(f"round {rnd + 1} {client:17s} {dt:6.3f} s  client {cpu / gib:5.2f} "
                          f"CPU-s/GiB  store {w / gib:5.2f}", flush=True)
        finally:
            sw.stop()
    lim = statistics.median(r[0] for r in res["limit"])
    print(f"\n{gib:.2f} GiB, {args.rounds} rounds, medians:\n")
    print("| client | s | x limit | client CPU-s/GiB | store CPU-s/GiB |")
    print("|---|---:|---:|---:|---:|")
    for c in CLIENTS:
        s = statistics.median(r[0] for r in res[c])
        print(f"| {c} | {s:.3f} | {s / lim:.2f} | {statistics.median(r[1] for r in res[c]):.2f} | "
              f"{statistics.median(r[2] for r in res[c]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
