"""Warm loads: a file whose every chunk is in p2pfs's local cache, against the same file on
local disk, page cache cold, every method in the same run (issue 10, "warm = local").

    sudo .venv/bin/python bench/bench_warm.py [--size-gib 2] [--rounds 3] [--settle 3]
        [--methods ...] [--json out.json]

One random bf16 safetensors file of ~size (bench_p2pfs.make_safetensors) is published to a
local SeaweedFS; a p2pfs mount loads it once (cold, which fills its cache) and the bytes are
copied to a plain local file. Then, each round, every method cold (`sync; echo 3 >
/proc/sys/vm/drop_caches`, then `--settle` seconds) in a fresh process, and for the p2pfs
methods a new daemon on the filled cache (mounted before the drop, outside the timing):

  st-local         safetensors.torch.load_file of the local copy (the anchor)
  gl-local         gpuload.load_file of the local copy
  gl-p2pfs         gpuload.load_file through the mount: the daemon hands over its local copy
  gl-p2pfs-fill    the same with local=False: the daemon fills gpuload's memory from its cache
  st-p2pfs         safetensors.torch.load_file through the mount (a plain reader: FUSE)
  read-local       sequential 8 MiB readinto of the local copy (a plain reader)
  read-p2pfs       the same through the mount

Timed until every byte of every tensor was touched (gpuload._bench.touch; reads: every byte
received). CPU: the worker's own user+system seconds, and the daemon's (from /proc) over the
measurement, per GiB. Prints a Markdown subsection: medians, ratios to st-local, CPU/GiB.
"""

from __future__ import annotations

import argparse
import datetime
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

from bench_gpuload_s3 import BUCKET, CREDS, KEY, drop_caches, p2pfs, publish_model  # noqa: E402

METHODS = ("st-local", "gl-local", "gl-p2pfs", "gl-p2pfs-fill", "st-p2pfs", "read-local",
           "read-p2pfs")


# --- workers: one measurement each, in a fresh process ------------------------------------

def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def work(a: argparse.Namespace) -> dict:
    from gpuload import _bench

    c0, t0 = _cpu(), time.perf_counter()
    if a.how == "st":
        from safetensors.torch import load_file

        check = _bench.touch(load_file(a.path).values())
    elif a.how == "gl":
        import gpuload

        check = _bench.touch(gpuload.load_file(a.path, local=bool(a.local)).values())
    else:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        check = 0
        with open(a.path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                check += n
    return {"seconds": time.perf_counter() - t0, "cpu": _cpu() - c0,
            "check": check if a.how != "read" else None}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--how", choices=("st", "gl", "read"), required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--local", type=int, default=1)
    print(json.dumps(work(ap.parse_args(argv))))
    return 0


# --- the driver -----------------------------------------------------------------------------

def daemon_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", type=Path, help="Write raw results here.")
    args = ap.parse_args()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if os.geteuid() != 0:
        print("bench_warm: needs root (drop_caches, FUSE)", file=sys.stderr)
        return 2
    from p2pfs.seaweed import SeaweedServer

    os.environ.update(CREDS)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    work_dir = Path(tempfile.mkdtemp(prefix="warm-bench-", dir="/var/tmp"))
    sw = SeaweedServer(work_dir / "sw")
    mnt, cache = work_dir / "mnt", work_dir / "cache"
    mnt.mkdir()
    local = work_dir / "local.safetensors"
    target = mnt / KEY
    results: dict[str, list[dict]] = {}
    mounted = False
    t_start = time.time()
    env: dict[str, str] = {}

    def mount() -> int:
        nonlocal mounted
        p2pfs("mount", f"s3://{BUCKET}", mnt, "--cache-dir", cache, "--json",
              "--log-file", work_dir / "p2pfs.log", env=env)
        mounted = True
        return json.loads(p2pfs("status", "--json", mnt, env=env))["pid"]

    def unmount() -> None:
        nonlocal mounted
        p2pfs("unmount", mnt, env=env)
        mounted = False

    try:
        sw.start()
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        size = publish_model(sw, work_dir, args.size_gib, env, log)
        mount()
        log("cold load to fill the cache ...")
        run_worker_here("gl", target, env)
        shutil.copyfile(target, local)
        deadline = time.monotonic() + 120
        while True:
            st = json.loads(p2pfs("status", "--json", mnt, env=env))
            if not st["writeback_pending"] and st["cache_sealed_files"] >= 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cache never held the file whole and sealed: {st}")
            time.sleep(0.2)
        unmount()
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            for m in methods:
                how, where = m.split("-")[0], m.split("-", 1)[1]
                path = local if where == "local" else target
                pid = mount() if where != "local" else None
                drop_caches(args.settle)
                d0 = daemon_cpu(pid) if pid else 0.0
                r = run_worker_here(how, path, env, local=int(m != "gl-p2pfs-fill"))
                r["daemon_cpu"] = daemon_cpu(pid) - d0 if pid else 0.0
                if pid:
                    st = json.loads(p2pfs("status", "--json", mnt, env=env))
                    if st["bytes_by_source"].get("origin", 0):
                        raise RuntimeError(f"{m}: warm load fetched from the origin: {st}")
                    r["local_opens"] = st["local_opens"]
                    unmount()
                results.setdefault(m, []).append(r)
                log(f"  {m:15s} {r['seconds']:7.3f} s  {size / r['seconds'] / 1e9:5.2f} GB/s  "
                    f"cpu {r['cpu']:.2f} + daemon {r['daemon_cpu']:.2f} s")
    finally:
        if mounted:
            try:
                unmount()
            except Exception as exc:  # noqa: BLE001 - report, then still stop weed
                log(f"unmount failed: {exc}")
        sw.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.time() - t_start
    checks = {r["check"] for rs in results.values() for r in rs if r["check"] is not None}
    if len(checks) > 1:
        raise RuntimeError(f"methods disagree on the bytes: {checks}")
    if "gl-p2pfs" in results and not all(r["local_opens"] >= 1 for r in results["gl-p2pfs"]):
        raise RuntimeError("gl-p2pfs was not handed the local copy")
    gib = size / 2**30
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
    anchor = med.get("st-local", float("nan"))
    cmd = "sudo .venv/bin/python bench/bench_warm.py " + " ".join(sys.argv[1:])
    lines = [
        "### Warm = local", "",
        f"Date: {datetime.date.today()}. Machine: 2-core VM, no GPU. Command: `{cmd.strip()}` "
        f"({args.rounds} rounds, {elapsed:.0f} s in all). File: {gib:.2f} GiB random bf16, "
        "cached whole by one cold p2pfs load; every measurement with the page cache dropped, "
        "in a fresh process, p2pfs ones on a new daemon. CPU = the loader's user+system "
        "seconds and the daemon's, per GiB.", "",
        "| method | median s | GB/s | x st-local | loader CPU s/GiB | daemon CPU s/GiB | runs (s) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m, rs in results.items():
        cpu = statistics.median(r["cpu"] for r in rs) / gib
        dcpu = statistics.median(r["daemon_cpu"] for r in rs) / gib
        runs = ", ".join(f"{r['seconds']:.3f}" for r in rs)
        lines.append(f"| {m} | {med[m]:.3f} | {size / med[m] / 1e9:.2f} | {med[m] / anchor:.2f} | "
                     f"{cpu:.2f} | {dcpu:.2f} | {runs} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"size": size, "results": results, "medians": med,
                                         "command": cmd}, indent=1))
    return 0


def run_worker_here(how: str, path: Path, env: dict[str, str], local: int = 1) -> dict:
    """One measurement in a fresh process (this VM's cost of fresh memory depends on what
    ran before in a process)."""
    import subprocess

    args = [sys.executable, __file__, "--worker", how, "--how", how, "--path", str(path),
            "--local", str(local)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode:
        raise RuntimeError(f"{how} worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
