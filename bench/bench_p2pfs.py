"""p2pfs read benchmark: side by side in one run, medians over rounds.

    .venv/bin/python bench/bench_p2pfs.py [--size-gib 2] [--rounds 3] [--json out.json]

On one local SeaweedFS (loopback), one ~2 GiB bf16 safetensors file, each round runs the
methods in the same order:
  limit       16 parallel 8 MiB ranged GETs into memory (aiobotocore), no disk
  p2pfs-cold  fresh cache dir, page cache dropped, sequential read through the mount
  local-cold  plain local copy, page cache dropped
  p2pfs-warm  new daemon on the filled cache dir, page cache dropped
  p2pfs-hot   repeated read of the same file (kernel page cache, keep_cache)
  p2pfs-warm-untuned  p2pfs-warm with the kernel's default read_ahead_kb/max_background
  cat-hot     `cat` of the local copy from the page cache
  s3fs-cold/-warm, rclone-cold/-warm   Debian's s3fs-fuse and rclone mount, caches on
Reads are sequential 8 MiB read()s into one reused buffer: the cost of the filesystem,
not of hashing. Needs root (FUSE, drop_caches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from p2pfs.seaweed import SeaweedServer  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
os.environ.update(ENV)
MiB = 1 << 20


def make_safetensors(path: Path, size: int) -> None:
    """A Llama-shaped bf16 file: layers of [4096, 4096] and [11008, 4096] until ~size."""
    tensors, off, i = {}, 0, 0
    shapes = [[4096, 4096]] * 4 + [[11008, 4096]] * 3
    while off < size:
        shape = shapes[i % len(shapes)]
        n = shape[0] * shape[1] * 2
        tensors[f"model.layers.{i // 7}.w{i % 7}"] = {"dtype": "BF16", "shape": shape,
                                                       "data_offsets": [off, off + n]}
        off += n
        i += 1
    header = json.dumps(tensors).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        # Every byte random: repeated blocks would dedup in p2pfs's content-addressed cache
        # and flatter it.
        left = off
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def read_all(path: Path) -> float:
    buf = bytearray(8 * MiB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    dt = time.perf_counter() - t0
    assert total == path.stat().st_size, f"{path}: read {total} of {path.stat().st_size} bytes"
    return dt


def cat_time(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


async def s3_limit(endpoint: str, bucket: str, key: str, size: int) -> float:
    from aiobotocore.session import get_session
    from botocore.config import Config

    sess = get_session()
    async with sess.create_client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=32)) as c:
        sem = asyncio.Semaphore(16)

        async def get(off: int) -> int:
            async with sem:
                r = await c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{min(size, off + 8 * MiB) - 1}")
                async with r["Body"] as b:
                    return len(await b.read())

        t0 = time.perf_counter()
        got = sum(await asyncio.gather(*(get(o) for o in range(0, size, 8 * MiB))))
        dt = time.perf_counter() - t0
        assert got == size
        return dt


def p2pfs(*args: str, endpoint: str) -> str:
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint)
    r = subprocess.run([sys.executable, "-m", "p2pfs", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return r.stdout


def wait_mounted(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while not os.path.ismount(path):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{proc.args[0]} did not mount {path}")
        time.sleep(0.1)


def unmount_proc(path: Path, proc: subprocess.Popen) -> None:
    subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    subprocess.run(["fusermount", "-u", str(path)], capture_output=True)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def s3fs_mount(endpoint: str, bucket: str, mnt: Path, cache: Path, work: Path) -> subprocess.Popen:
    pw = work / "s3fs.passwd"
    pw.write_text(f"{ENV['AWS_ACCESS_KEY_ID']}:{ENV['AWS_SECRET_ACCESS_KEY']}\n")
    pw.chmod(0o600)
    proc = subprocess.Popen(["s3fs", bucket, str(mnt), "-f", "-o", f"url={endpoint}",
                             "-o", "use_path_request_style", "-o", f"passwd_file={pw}",
                             "-o", f"use_cache={cache}", "-o", "parallel_count=16"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "s3fs.log", "ab"))
    wait_mounted(mnt, proc)
    return proc


def rclone_mount(endpoint: str, bucket: str, mnt: Path, cache: Path, work: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["rclone", "mount", f":s3:{bucket}", str(mnt), "--s3-provider", "Other",
                             "--s3-endpoint", endpoint, "--s3-access-key-id", ENV["AWS_ACCESS_KEY_ID"],
                             "--s3-secret-access-key", ENV["AWS_SECRET_ACCESS_KEY"],
                             "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--read-only"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "rclone.log", "ab"),
                            # rclone 1.60 cannot combine AWS_CA_BUNDLE with its transport.
                            env={k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"})
    wait_mounted(mnt, proc)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-others", action="store_true", help="skip s3fs and rclone")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p2pfs-bench-", dir="/var/tmp"))
    sw = SeaweedServer(work / "sw")
    results: dict[str, list[float]] = {}
    mounts: list[tuple[Path, subprocess.Popen | None]] = []

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)
        print(f"  {name:18s} {seconds:7.2f}s  {size / seconds / 1e9:6.2f} GB/s", flush=True)

    try:
        sw.start()
        sw.create_bucket("bench")
        src = work / "src" / "llama"
        src.mkdir(parents=True)
        make_safetensors(src / "model.safetensors", int(args.size_gib * (1 << 30)))
        size = (src / "model.safetensors").stat().st_size
        print(f"file: {size / 2**30:.2f} GiB; uploading...", flush=True)
        p2pfs("publish", str(src), "s3://bench/llama", endpoint=sw.endpoint)
        local = work / "local.safetensors"
        shutil.copyfile(src / "model.safetensors", local)
        shutil.rmtree(work / "src")
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            drop_caches()
            record("limit", asyncio.run(s3_limit(sw.endpoint, "bench", "llama/model.safetensors", size)))

            mnt, cache = work / "mnt", work / f"cache{r}"
            mnt.mkdir(exist_ok=True)
            p2pfs("mount", "s3://bench", str(mnt), "--cache-dir", str(cache), endpoint=sw.endpoint)
            drop_caches()
            record("p2pfs-cold", read_all(mnt / "llama" / "model.safetensors"))
            status = json.loads(p2pfs("status", "--json", str(mnt), endpoint=sw.endpoint))
            assert status["bytes_by_source"]["origin"] >= size, "cold read did not come from S3"
            while json.loads(p2pfs("status", "--json", str(mnt), endpoint=sw.endpoint))["writeback_pending"]:
                time.sleep(0.2)
            p2pfs("unmount", str(mnt), endpoint=sw.endpoint)
            time.sleep(0.5)
            if status["writeback_dropped"]:
                # Chunks the cold read skipped writing back (queue full) are fetched again by
                # `prefetch` so that the warm round really reads from the local disk only.
                print(f"  (cold read dropped {status['writeback_dropped']} write-backs)")
            p2pfs("mount", "s3://bench", str(mnt), "--cache-dir", str(cache), endpoint=sw.endpoint)
            p2pfs("prefetch", str(mnt / "llama"), endpoint=sw.endpoint)
            p2pfs("unmount", str(mnt), endpoint=sw.endpoint)
            time.sleep(0.5)

            drop_caches()
            record("local-cold", read_all(local))

            p2pfs("mount", "s3://bench", str(mnt), "--cache-dir", str(cache), endpoint=sw.endpoint)
            drop_caches()
            record("p2pfs-warm", read_all(mnt / "llama" / "model.safetensors"))
            st = json.loads(p2pfs("status", "--json", str(mnt), endpoint=sw.endpoint))
            assert st["bytes_by_source"].get("origin", 0) == 0, "warm read went to the origin"
            read_all(mnt / "llama" / "model.safetensors")
            record("p2pfs-hot", read_all(mnt / "llama" / "model.safetensors"))
            p2pfs("unmount", str(mnt), endpoint=sw.endpoint)
            time.sleep(0.5)
            # The same warm read with the kernel's defaults instead of our tuning
            # (read_ahead_kb 128, max_background 12): what the sysfs tuning buys.
            untuned = work / "untuned.toml"
            untuned.write_text("[mount]\nread_ahead_kb = 128\nmax_background = 12\n")
            p2pfs("--config", str(untuned), "mount", "s3://bench", str(mnt), "--cache-dir", str(cache),
                  endpoint=sw.endpoint)
            drop_caches()
            record("p2pfs-warm-untuned", read_all(mnt / "llama" / "model.safetensors"))
            p2pfs("unmount", str(mnt), endpoint=sw.endpoint)
            shutil.rmtree(cache)
            cat_time(local)
            record("cat-hot", cat_time(local))

            if not args.skip_others:
                for name, fn in (("s3fs", s3fs_mount), ("rclone", rclone_mount)):
                    if not shutil.which(name):
                        continue
                    omnt, ocache = work / f"{name}-mnt", work / f"{name}-cache"
                    omnt.mkdir(exist_ok=True)
                    ocache.mkdir(exist_ok=True)
                    drop_caches()
                    proc = fn(sw.endpoint, "bench", omnt, ocache, work)
                    mounts.append((omnt, proc))
                    try:
                        record(f"{name}-cold", read_all(omnt / "llama" / "model.safetensors"))
                        drop_caches()
                        record(f"{name}-warm", read_all(omnt / "llama" / "model.safetensors"))
                    finally:
                        unmount_proc(omnt, proc)
                        mounts.pop()
                        shutil.rmtree(ocache, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        print("\nmedians (seconds, GB/s):")
        for k, v in med.items():
            print(f"  {k:18s} {v:7.2f}s  {size / v / 1e9:6.2f} GB/s")

        def ratio(a: str, b: str) -> float | None:
            return round(med[b] / med[a], 3) if a in med and b in med else None

        ratios = {
            "cold_vs_limit (target >= 0.85)": ratio("p2pfs-cold", "limit"),
            "warm_vs_local (target >= 0.8)": ratio("p2pfs-warm", "local-cold"),
            "hot_vs_cat (target >= 0.4)": ratio("p2pfs-hot", "cat-hot"),
            "warm_tuned_vs_untuned": ratio("p2pfs-warm", "p2pfs-warm-untuned"),
            "cold_vs_s3fs (target > 1)": ratio("p2pfs-cold", "s3fs-cold"),
            "warm_vs_s3fs (target > 1)": ratio("p2pfs-warm", "s3fs-warm"),
            "cold_vs_rclone (target > 1)": ratio("p2pfs-cold", "rclone-cold"),
            "warm_vs_rclone (target > 1)": ratio("p2pfs-warm", "rclone-warm"),
        }
        print("throughput ratios:", json.dumps(ratios, indent=1))
        if args.json:
            args.json.write_text(json.dumps({"size": size, "runs": results, "medians": med,
                                             "ratios": ratios}, indent=1))
    finally:
        for mnt_, proc in mounts:
            unmount_proc(mnt_, proc)
        if os.path.ismount(work / "mnt"):
            subprocess.run(["fusermount3", "-u", str(work / "mnt")], capture_output=True)
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
