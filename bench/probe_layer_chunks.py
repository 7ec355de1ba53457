"""Probe: which chunk size should image layers use? (bench/RESULTS.md, "Image layer chunk size")

Three measurements per candidate size (64 KiB, 256 KiB, 1 MiB, 4 MiB):
1. compression: zstd level 3, one frame per chunk, over real files (Python's standard
   library and the torch install), ratio and compression speed;
2. random access: one chunk ranged-GET from a pack in a real SeaweedFS on loopback, then
   inflated: median and p90 latency over random chunks;
3. what a container start touches: the page cache is dropped, `import torch` runs, and
   mincore() over every file of the sample says which pages were read; mapped onto chunks
   of each size, that is the bytes a lazy start fetches and the number of chunk reads.

Run as root (drop_caches), on a quiet machine, in well under 2 minutes:
    .venv/bin/python bench/probe_layer_chunks.py [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio_asyncio
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from p2pfs.config import S3Config  # noqa: E402
from p2pfs.origin._s3 import S3Origin  # noqa: E402
from p2pfs.seaweed import SeaweedServer  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
SITE = Path(sys.executable).resolve().parents[1] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
TORCH = Path(os.path.dirname(__import__("importlib.util").util.find_spec("torch").origin))
PAGE = os.sysconf("SC_PAGE_SIZE")


def sample_files() -> list[Path]:
    files = [Path(p) for p in glob.glob("/usr/lib/python3*/**/*", recursive=True)]
    files += [p for p in TORCH.rglob("*")]
    return sorted({p for p in files if p.is_file() and not p.is_symlink()})


def compression(files: list[Path], size: int, cap: int) -> dict:
    """Ratio and speed over the first `cap` bytes of the sample (files whole)."""
    z = zstandard.ZstdCompressor(level=3, write_content_size=True)
    plain = stored = 0
    t0 = time.process_time()
    for p in files:
        with open(p, "rb") as f:
            while block := f.read(size):
                plain += len(block)
                stored += len(z.compress(block))
        if plain >= cap:
            break
    cpu = time.process_time() - t0
    return {"plain": plain, "stored": stored, "ratio": round(plain / stored, 3),
            "mb_per_cpu_s": round(plain / 1e6 / cpu, 1)}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident(path: Path) -> list[int]:
    """Indexes of the pages of `path` in the page cache (mincore over a mapping; mapping
    a file reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return []
    npages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * npages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return [i for i in range(npages) if vec[i] & 1]


def touched_by_import(files: list[Path]) -> dict[Path, list[int]]:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    took = time.monotonic() - t0
    pages = {p: r for p in files if (r := resident(p))}
    print(f"import torch (cold page cache): {took:.1f}s, {len(pages)} files touched", file=sys.stderr)
    return pages


def start_cost(pages: dict[Path, list[int]], size: int) -> dict:
    chunks = fetched = 0
    for p, idx in pages.items():
        fsize = p.stat().st_size
        touched = {i * PAGE // size for i in idx}
        chunks += len(touched)
        fetched += sum(min(size, fsize - c * size) for c in touched)
    return {"chunks": chunks, "fetched_mb": round(fetched / 1e6, 1)}


async def latency(endpoint: str, big: Path, sizes: list[int], reads: int) -> dict[int, dict]:
    async with trio_asyncio.open_loop():
        origin = await S3Origin.create("probe", S3Config(endpoint_url=endpoint))
        try:
            await origin.create_bucket()
            out = {}
            z = zstandard.ZstdCompressor(level=3, write_content_size=True)
            d = zstandard.ZstdDecompressor()
            for size in sizes:
                pack, frames = bytearray(), []
                with open(big, "rb") as f:  # 32 MiB of real content per pack
                    while len(pack) < 32 * MiB and (block := f.read(size)):
                        frame = z.compress(block)
                        frames.append((len(pack), len(frame), len(block)))
                        pack += frame
                key = f"pack-{size}"
                await origin.put(key, bytes(pack))
                rng = random.Random(size)
                times = []
                for _ in range(reads):
                    off, length, n = rng.choice(frames)
                    t0 = time.perf_counter()
                    data = await origin.get_range(key, off, length)
                    d.decompress(data, max_output_size=n)
                    times.append((time.perf_counter() - t0) * 1000)
                times.sort()
                out[size] = {"median_ms": round(statistics.median(times), 2),
                             "p90_ms": round(times[int(len(times) * 0.9)], 2)}
            return out
        finally:
            await origin.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cap-mb", type=int, default=300, help="bytes of the sample compressed per size")
    ap.add_argument("--reads", type=int, default=40)
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "probe")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "probe")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    t_start = time.monotonic()
    files = sample_files()
    # The biggest files first would make the ratio that of one .so: interleave instead.
    random.Random(0).shuffle(files)
    pages = touched_by_import(files)
    big = TORCH / "lib" / "libtorch_cpu.so"
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedServer(Path(tmp)).start()
        try:
            lat = trio.run(latency, server.endpoint, big, SIZES, args.reads)
        finally:
            server.stop()
    rows = []
    for size in SIZES:
        row = {"chunk_kib": size // KiB, **compression(files, size, args.cap_mb * MiB),
               **lat[size], **start_cost(pages, size)}
        rows.append(row)
        print(json.dumps(row))
    total = sum(p.stat().st_size for p in pages)
    print(f"touched files total {total / 1e6:.0f} MB; pages resident "
          f"{sum(len(v) for v in pages.values()) * PAGE / 1e6:.1f} MB; "
          f"probe ran {time.monotonic() - t_start:.0f}s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
