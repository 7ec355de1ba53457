"""Where a cold gpuload load through p2pfs spends CPU: one load per variant and round, with the
CPU seconds of SeaweedFS, of the p2pfs daemon and of the loading process.

    .venv/bin/python bench/probe_p2pfs_cpu.py [--rounds 2] [--size-gib 2] \
        "fill=1" "fill=0" "fill=1 --cache-size 1MiB" ...

A variant is `fill=0|1` (gpuload's `fill` option), optionally `hash=sha256|blake3` (the
model published again with that chunk hash, docs/FORMAT.md v3; default: the publish
default), then extra `p2pfs mount` flags.
Each load: a fresh mount with an empty cache dir, `sync; echo 3 > drop_caches`, 3 s settle,
`gpuload.load_file` + touch in a fresh process (bench_gpuload_s3's worker). An exploration
tool (single runs on a noisy VM), not a benchmark: bench_gpuload_s3.py gives the medians.
Needs root, FUSE and weed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gpuload_s3 import (  # noqa: E402
    BUCKET, CREDS, KEY, drop_caches, p2pfs, publish_model, run_worker)

from p2pfs.seaweed import SeaweedServer  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its waited-for children, from /proc."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--warm", action="store_true",
                    help="also time a second load of each variant from the filled disk "
                         "cache (page cache dropped again)")
    args = ap.parse_args()
    os.environ.update(CREDS)
    work = Path(tempfile.mkdtemp(prefix="probe-p2pfs-", dir="/var/tmp"))
    sw = SeaweedServer(work / "sw")
    mnt = work / "mnt"
    mnt.mkdir()
    results: dict[str, list[float]] = {}
    try:
        sw.start()
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        hashes = sorted({f.split("=", 1)[1] for v in args.variants for f in v.split()
                         if f.startswith("hash=")})
        publish_model(sw, work, args.size_gib, env, hashes=tuple(hashes))
        assert sw.proc is not None
        weed = sw.proc.pid  # weed runs as one process
        for r in range(args.rounds):
            for variant in args.variants:
                fill, *flags = variant.split()
                key = KEY
                if flags and flags[0].startswith("hash="):
                    key = f"llama-{flags.pop(0).split('=', 1)[1]}/model.safetensors"
                cache = work / "cache"
                info = json.loads(p2pfs("mount", f"s3://{BUCKET}", mnt, "--cache-dir", cache,
                                        "--json", *flags, env=env).strip().splitlines()[-1])
                try:
                    drop_caches(3)
                    w0, d0, c0 = cpu_seconds(weed), cpu_seconds(info["pid"]), children_cpu()
                    out = run_worker("gpuload", env, path=mnt / key,
                                     fill=int(fill.split("=")[1]))
                    w1, d1, c1 = cpu_seconds(weed), cpu_seconds(info["pid"]), children_cpu()
                    while json.loads(p2pfs("status", "--json", mnt, env=env))["writeback_pending"]:
                        time.sleep(0.2)
                    if args.warm:
                        drop_caches(3)
                        d2 = cpu_seconds(info["pid"])
                        again = run_worker("gpuload", env, path=mnt / key,
                                           fill=int(fill.split("=")[1]))
                        results.setdefault(variant + " (warm cache)", []).append(
                            again["seconds"])
                        print(f"round {r + 1} {variant!r} from the disk cache: load "
                              f"{again['seconds']:.2f} s, daemon CPU "
                              f"{cpu_seconds(info['pid']) - d2:.1f} s", flush=True)
                finally:
                    p2pfs("unmount", mnt, env=env)
                    shutil.rmtree(cache, ignore_errors=True)
                results.setdefault(variant, []).append(out["seconds"])
                print(f"round {r + 1} {variant!r}: load {out['seconds']:.2f} s, CPU s: weed "
                      f"{w1 - w0:.1f}, daemon {d1 - d0:.1f}, loader process (imports "
                      f"included) {c1 - c0:.1f}", flush=True)
    finally:
        if os.path.ismount(mnt):
            p2pfs("unmount", mnt, env=dict(os.environ))
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    for variant, runs in results.items():
        print(f"{variant!r}: median {statistics.median(runs):.2f} s over {len(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
