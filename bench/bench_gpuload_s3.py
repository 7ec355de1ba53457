"""gpuload from S3: through a p2pfs mount vs Run:ai Model Streamer's S3 backend vs s3fs vs
`aws s3 cp` then `safetensors.torch.load_file`, against the S3 limit, on one local SeaweedFS
(loopback): wall time and client CPU per GiB, cold and warm.

    sudo .venv/bin/python bench/bench_gpuload_s3.py [--size-gib 2] [--rounds 3] [--settle 3]
        [--runai-concurrency 8,16,32] [--methods limit,gpuload,...] [--json out.json]

One random bf16 safetensors file of ~size (bench_p2pfs.make_safetensors) is published with
`p2pfs publish`. Each round runs the methods in the same order, each measurement with the page
cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, then `--settle` seconds) and in a
fresh process (this VM's cost of fresh memory depends on what ran before; imports are
outside the timing). `--methods` picks from:

  limit            16 parallel 8 MiB ranged GETs into memory (bench_p2pfs.s3_limit), no disk
                   (always runs)
  gpuload          gpuload.load_file on the file under a p2pfs mount with a fresh --cache-dir
                   (mounted before the drop, outside the timing); the daemon writes the file
                   into gpuload's memory (the control socket's `fill`)
  gpuload-fuse     the same with fill=False: reads through FUSE with the prefetch hint
  st-p2pfs         safetensors.torch.load_file through a cold p2pfs mount (a plain reader)
  runai            runai_model_streamer.SafetensorsStreamer on the s3:// URL,
                   RUNAI_STREAMER_CONCURRENCY=N, one entry per N (the issue asks for its best)
  s3fs             Debian's s3fs-fuse mounted with a fresh use_cache dir (before the drop),
                   then safetensors.torch.load_file through it
  awscp            `aws s3 cp` (the CLI, default settings) to a local file, then
                   safetensors.torch.load_file on it
  warm             warm variants of the above, after their cold load: p2pfs a new daemon on
                   the cache the cold `gpuload` load filled (gpuload handed the local copy;
                   gpuload with local=False, filled from the cache; safetensors through
                   FUSE); s3fs the same mount again, its use_cache filled; aws-cp
                   load_file of the downloaded file. Run:ai keeps nothing: cold only.

Timed until every byte of every tensor was touched (gpuload._bench.touch, the same for all);
the limit only receives the bytes (it is the bound, not a loader). The touch sums must agree.

CPU, per measurement: the loader (the worker's own user+system seconds, RUSAGE_SELF, which
counts all its threads, Run:ai's C++ ones included) and the client's daemon (p2pfs: the
daemon's /proc utime+stime over the measurement, plus its write-back tail until the cache
holds the file; s3fs: its process; aws-cp: the `aws` child, RUSAGE_CHILDREN). SeaweedFS is
the object store and never counted (its CPU is shown apart). Kernel work done outside these
processes (softirqs, kworkers flushing dirty pages) is not in anyone's figure.
Prints a Markdown subsection: medians, ratios to the limit and to Run:ai, CPU-s per GiB.
Needs root (drop_caches, FUSE), weed, s3fs and aws on PATH, and the bench extra
(runai-model-streamer-s3).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

BUCKET, KEY = "bench", "llama/model.safetensors"
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
METHODS = ("limit", "gpuload", "gpuload-fuse", "st-p2pfs", "runai", "s3fs", "awscp", "warm")


# --- workers: one measurement each, in a fresh process; print {"seconds", "check", CPU} -----

def _touch(tensors) -> int:
    from gpuload import _bench

    return _bench.touch(tensors)


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def work_limit(a: argparse.Namespace) -> dict:
    from bench_p2pfs import s3_limit

    return {"seconds": asyncio.run(s3_limit(a.endpoint, BUCKET, KEY, a.size)), "check": None}


def work_gpuload(a: argparse.Namespace) -> dict:
    import gpuload

    t0 = time.perf_counter()
    sd = gpuload.load_file(a.path, device="cpu", fill=bool(a.fill), local=bool(a.local))
    check = _touch(sd.values())
    return {"seconds": time.perf_counter() - t0, "check": check}


def work_st(a: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    check = _touch(load_file(a.path).values())
    return {"seconds": time.perf_counter() - t0, "check": check}


def work_runai(a: argparse.Namespace) -> dict:
    from runai_model_streamer import SafetensorsStreamer

    t0 = time.perf_counter()
    tensors = []
    with SafetensorsStreamer() as s:
        s.stream_files([f"s3://{BUCKET}/{KEY}"], device="cpu")
        for _, t in s.get_tensors():
            tensors.append(t)
    check = _touch(tensors)
    return {"seconds": time.perf_counter() - t0, "check": check}


def work_awscp(a: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    subprocess.run([a.aws, "s3", "cp", f"s3://{BUCKET}/{KEY}", a.path, "--endpoint-url",
                    a.endpoint, "--only-show-errors"], check=True)
    check = _touch(load_file(a.path).values())
    return {"seconds": time.perf_counter() - t0, "check": check}


WORKERS = {"limit": work_limit, "gpuload": work_gpuload, "st": work_st, "runai": work_runai,
           "awscp": work_awscp}
#: What each worker imports, done before its CPU is taken (torch alone is seconds of CPU).
IMPORTS = {"limit": ["bench_p2pfs", "aiobotocore.session"], "gpuload": ["gpuload"],
           "st": ["safetensors.torch", "gpuload._bench"],
           "runai": ["runai_model_streamer", "gpuload._bench"],
           "awscp": ["safetensors.torch", "gpuload._bench"]}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=WORKERS, required=True)
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--path", default="")
    ap.add_argument("--aws", default="aws")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--fill", type=int, default=1)
    ap.add_argument("--local", type=int, default=1)
    a = ap.parse_args(argv)
    for mod in IMPORTS[a.worker]:
        importlib.import_module(mod)
    # Taken right around the measurement: imports and argument parsing are not in it.
    c0, k0 = _cpu(), _cpu(resource.RUSAGE_CHILDREN)
    out = WORKERS[a.worker](a)
    out.update(cpu=_cpu() - c0, child_cpu=_cpu(resource.RUSAGE_CHILDREN) - k0)
    print(json.dumps(out))
    return 0


# --- the driver -----------------------------------------------------------------------------

def drop_caches(settle: float) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(settle)


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """utime + stime of a live process (all its threads, those that ended included), or of
    one of its threads, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_worker(kind: str, env: dict[str, str], **kw: object) -> dict:
    args = [sys.executable, __file__, "--worker", kind]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode:
        raise RuntimeError(f"{kind} worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def publish_model(sw, work: Path, size_gib: float, env: dict[str, str], log=print,
                  hashes: tuple[str, ...] = ()) -> int:
    """Create the bucket on a started SeaweedFS, write one random bf16 file of ~size_gib
    and `p2pfs publish` it as s3://BUCKET/KEY (the default chunk hash), and for each of
    `hashes` also as s3://BUCKET/llama-<hash>/ (`--chunk-hash`); the local copy is removed.
    Its size."""
    from bench_p2pfs import make_safetensors

    sw.create_bucket(BUCKET)
    src = work / "src" / "llama"
    src.mkdir(parents=True)
    make_safetensors(src / "model.safetensors", int(size_gib * (1 << 30)))
    size = (src / "model.safetensors").stat().st_size
    log(f"file: {size / 2**30:.2f} GiB; publishing ...")
    p2pfs("publish", src, f"s3://{BUCKET}/llama", env=env)
    for h in hashes:
        p2pfs("publish", src, f"s3://{BUCKET}/llama-{h}", "--chunk-hash", h, env=env)
    shutil.rmtree(work / "src")
    return size


def p2pfs(*args: object, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-m", "p2pfs", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    if r.returncode:
        raise RuntimeError(f"p2pfs {args[0]} failed: {r.stderr[-4000:]}")
    return r.stdout


def runai_env(base: dict[str, str], endpoint: str, concurrency: int) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k != "AWS_CA_BUNDLE"}  # plain http; its CRT chokes on it
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
               RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",  # SeaweedFS: path-style buckets
               RUNAI_STREAMER_CONCURRENCY=str(concurrency))
    return env


def versions(aws: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "safetensors", "runai-model-streamer", "runai-model-streamer-s3",
                "aiobotocore"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    r = subprocess.run([aws, "--version"], capture_output=True, text=True, check=False)
    out.append((r.stdout or r.stderr).split()[0] if r.returncode == 0 else "aws (failed)")
    if shutil.which("s3fs"):
        r = subprocess.run(["s3fs", "--version"], capture_output=True, text=True, check=False)
        out.append(next((f"s3fs {w}" for w in r.stdout.split() if w.startswith("V")), "s3fs (?)"))
    else:
        out.append("s3fs (not installed)")
    weed = subprocess.run([_weed(), "version"], capture_output=True, text=True,
                          check=False).stdout.split()
    out.append(f"SeaweedFS {weed[2] if len(weed) > 2 else '?'}")
    return ", ".join(out)


def _weed() -> str:
    from p2pfs.seaweed import find_weed

    return find_weed()


class Bench:
    """One run: the mounts, the measurements and their CPU accounting."""

    def __init__(self, args: argparse.Namespace, work: Path, sw, env: dict[str, str],
                 size: int, log: Callable[[str], None]) -> None:
        self.args, self.work, self.sw, self.env, self.size, self.log = args, work, sw, env, size, log
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.mounted = False
        self.results: dict[str, list[dict]] = {}
        self.server_cpu_end = 0.0  # the server's CPU at the end of the last measurement

    # -- one measurement ------------------------------------------------------------------
    def measure(self, name: str, kind: str, env: dict[str, str] | None = None,
                server: int | None = None, **kw: object) -> dict:
        """Drop the page cache, run one worker, and record its time and the CPU of the
        loader, of `server` (the client's daemon: p2pfs or s3fs) and of SeaweedFS."""
        drop_caches(self.args.settle)
        weed = self.sw.proc.pid
        w0, s0 = proc_cpu(weed), proc_cpu(server) if server else 0.0
        t0 = proc_cpu(server, server) if server else 0.0
        r = run_worker(kind, env or self.env, **kw)
        self.server_cpu_end = proc_cpu(server) if server else 0.0
        r["daemon"] = self.server_cpu_end - s0 if server else r["child_cpu"]
        r["daemon_trio"] = proc_cpu(server, server) - t0 if server else 0.0
        r["tail"] = 0.0
        r["store"] = proc_cpu(weed) - w0
        self.results.setdefault(name, []).append(r)
        return r

    def show(self, name: str) -> None:
        r, gib = self.results[name][-1], self.size / 2**30
        self.log(f"  {name:26s} {r['seconds']:7.3f} s  {self.size / r['seconds'] / 1e9:5.2f} GB/s"
                 f"  CPU s/GiB: loader {r['cpu'] / gib:.2f} daemon {r['daemon'] / gib:.2f}"
                 f" (+{r['tail'] / gib:.2f} tail) store {r['store'] / gib:.2f}")

    # -- p2pfs ------------------------------------------------------------------------------
    def mount(self, cache: Path) -> int:
        p2pfs("mount", f"s3://{BUCKET}", self.mnt, "--cache-dir", cache, "--json",
              "--log-file", self.work / "p2pfs.log", env=self.env)
        self.mounted = True
        return self.status()["pid"]

    def status(self) -> dict:
        return json.loads(p2pfs("status", "--json", self.mnt, env=self.env))

    def unmount(self) -> None:
        p2pfs("unmount", self.mnt, env=self.env)
        self.mounted = False

    def p2pfs_cold(self, name: str, kind: str, cache: Path, **kw: object) -> None:
        """One cold load through a fresh mount on an empty cache; the daemon's CPU until its
        write-back has ended (and the file is sealed, where it came whole) is the tail."""
        pid = self.mount(cache)
        r = self.measure(name, kind, server=pid, path=self.mnt / KEY, **kw)
        st = self.status()
        if st["bytes_by_source"].get("origin", 0) < self.size:
            raise RuntimeError(f"{name}: cold p2pfs load not from S3: {st['bytes_by_source']}")
        if kw.get("fill") is not None and (st["fill_bytes"] >= self.size) != bool(kw["fill"]):
            raise RuntimeError(f"{name}: fill_bytes {st['fill_bytes']} (fill={kw['fill']})")
        # The tail ends when the write-back queue is empty, a filled file is sealed, and
        # the daemon has gone quiet (a file made whole through FUSE is read back and sealed
        # too, in the background).
        deadline, prev = time.monotonic() + 120, -1.0
        while (st["writeback_pending"] or (kw.get("fill") and st["cache_sealed_files"] < 1)
               or proc_cpu(pid) - prev > 0.02):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: write-back never ended: {st}")
            prev = proc_cpu(pid)
            time.sleep(0.5)
            st = self.status()
        r["tail"] = proc_cpu(pid) - self.server_cpu_end
        self.unmount()
        self.show(name)

    def p2pfs_warm(self, name: str, kind: str, cache: Path, **kw: object) -> None:
        pid = self.mount(cache)
        self.measure(name, kind, server=pid, path=self.mnt / KEY, **kw)
        st = self.status()
        if st["bytes_by_source"].get("origin", 0):
            raise RuntimeError(f"{name}: warm load fetched from the origin: {st}")
        if kw.get("local") and not st["local_opens"]:
            raise RuntimeError(f"{name}: gpuload was not handed the local copy: {st}")
        self.unmount()
        self.show(name)

    # -- s3fs ---------------------------------------------------------------------------------
    def s3fs(self, warm: bool) -> None:
        from bench_p2pfs import s3fs_mount, unmount_proc

        omnt, cache = self.work / "s3fs-mnt", self.work / "s3fs-cache"
        omnt.mkdir(exist_ok=True)
        cache.mkdir()
        proc = s3fs_mount(self.sw.endpoint, BUCKET, omnt, cache, self.work)
        try:
            self.measure("s3fs+load_file", "st", server=proc.pid, path=omnt / KEY)
            self.show("s3fs+load_file")
            if warm:  # the same mount: its use_cache holds the file now
                self.measure("s3fs+load_file (warm)", "st", server=proc.pid, path=omnt / KEY)
                self.show("s3fs+load_file (warm)")
        finally:
            unmount_proc(omnt, proc)
            shutil.rmtree(cache, ignore_errors=True)

    # -- one round ------------------------------------------------------------------------
    def round(self, rnd: int, methods: set[str], concurrencies: list[int], aws: str) -> None:
        warm = "warm" in methods
        self.measure("limit", "limit", endpoint=self.sw.endpoint, size=self.size)
        self.show("limit")
        if "gpuload" in methods:
            cache = self.work / f"cache{rnd}"
            self.p2pfs_cold("gpuload-p2pfs", "gpuload", cache, fill=1)
            if warm:
                self.p2pfs_warm("gpuload-p2pfs (warm, local copy)", "gpuload", cache, local=1)
                self.p2pfs_warm("gpuload-p2pfs (warm, fill)", "gpuload", cache, local=0)
                self.p2pfs_warm("st-p2pfs (warm)", "st", cache)
            shutil.rmtree(cache)
        for flag, name, kind, kw in (("gpuload-fuse", "gpuload-p2pfs-fuse", "gpuload", {"fill": 0}),
                                     ("st-p2pfs", "st-p2pfs", "st", {})):
            if flag in methods:
                cache = self.work / f"cache{rnd}"
                self.p2pfs_cold(name, kind, cache, **kw)
                shutil.rmtree(cache)
        for c in concurrencies if "runai" in methods else ():
            self.measure(f"runai-s3 c{c}", "runai", runai_env(self.env, self.sw.endpoint, c))
            self.show(f"runai-s3 c{c}")
        if "s3fs" in methods:
            self.s3fs(warm)
        if "awscp" in methods:
            download = self.work / "download.safetensors"
            self.measure("aws-cp+load_file", "awscp", endpoint=self.sw.endpoint, path=download,
                         aws=aws)
            self.show("aws-cp+load_file")
            if warm:
                self.measure("aws-cp+load_file (warm)", "st", path=download)
                self.show("aws-cp+load_file (warm)")
            download.unlink()


def per_gib(runs: list[dict], size: int, f: Callable[[dict], float]) -> float:
    return statistics.median(f(r) for r in runs) / (size / 2**30)


def total_cpu(r: dict) -> float:
    """The client's CPU for one load: loader, daemon over the load, and its write-back tail."""
    return r["cpu"] + r["daemon"] + r["tail"]


def table(res: dict[str, list[dict]], nbytes: int, limit: float, runai: float,
          runai_cpu: float) -> list[str]:
    rows = ["| method | median s | GB/s | x limit | x Run:ai best | CPU-s/GiB: loader | daemon "
            "| write-back tail | **total** | x Run:ai CPU | daemon's trio thread | store "
            "(not counted) | runs (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, runs in res.items():
        med = statistics.median(r["seconds"] for r in runs)
        tot = per_gib(runs, nbytes, total_cpu)
        rows.append(
            f"| {m} | {med:.3f} | {nbytes / med / 1e9:.2f} | {med / limit:.2f} | "
            f"{med / runai:.2f} | {per_gib(runs, nbytes, lambda r: r['cpu']):.2f} | "
            f"{per_gib(runs, nbytes, lambda r: r['daemon']):.2f} | "
            f"{per_gib(runs, nbytes, lambda r: r['tail']):.2f} | **{tot:.2f}** | "
            f"{tot / runai_cpu:.2f} | {per_gib(runs, nbytes, lambda r: r['daemon_trio']):.2f} | "
            f"{per_gib(runs, nbytes, lambda r: r['store']):.2f} | "
            f"{', '.join(format(r['seconds'], '.3f') for r in runs)} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--runai-concurrency", default="8,16,32",
                    help="comma-separated RUNAI_STREAMER_CONCURRENCY values, each a method")
    ap.add_argument("--json", type=Path, help="Write raw results here.")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (the limit always runs)")
    args = ap.parse_args()
    methods = set(args.methods.split(",")) | {"limit"}
    if unknown := methods - set(METHODS):
        ap.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("bench_gpuload_s3: needs root (drop_caches, FUSE)", file=sys.stderr)
        return 2
    aws = shutil.which("aws")
    for tool, needed in (("aws", "awscp"), ("s3fs", "s3fs")):
        if needed in methods and shutil.which(tool) is None:
            print(f"bench_gpuload_s3: needs `{tool}` on PATH (or drop {needed} from --methods)",
                  file=sys.stderr)
            return 2
    concurrencies = [int(c) for c in args.runai_concurrency.split(",") if c]

    from p2pfs.seaweed import SeaweedServer

    # weed takes its S3 identity from the environment it starts in.
    os.environ.update(CREDS)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="gpuload-s3-bench-", dir="/var/tmp"))
    sw = SeaweedServer(work / "sw")
    bench: Bench | None = None
    t_start = time.time()
    failed = True
    try:
        sw.start()
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        size = publish_model(sw, work, args.size_gib, env, log)
        bench = Bench(args, work, sw, env, size, log)
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            bench.round(rnd, methods, concurrencies, aws or "aws")
        failed = False
    finally:
        if bench is not None and bench.mounted:
            try:
                bench.unmount()
            except Exception as exc:  # noqa: BLE001 - report, then still stop weed
                log(f"unmount failed: {exc}")
        sw.stop()
        if failed:  # keep the daemons' logs for the post-mortem
            keep = Path(tempfile.mkdtemp(prefix="gpuload-s3-bench-logs-"))
            for f in [*work.glob("*.log"), sw.log_path]:
                if f.exists():
                    shutil.copy(f, keep)
            log(f"logs kept in {keep}")
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t_start
    results = bench.results

    checks = {r["check"] for runs in results.values() for r in runs if r["check"] is not None}
    if len(checks) != 1:
        raise RuntimeError(f"methods disagree on the bytes: {checks}")
    med = {m: statistics.median(r["seconds"] for r in v) for m, v in results.items()}
    cpu = {m: per_gib(v, size, total_cpu) for m, v in results.items()}
    runais = [m for m in med if m.startswith("runai-s3")]
    runai_best = min(runais, key=med.__getitem__) if runais else None
    runai_frugal = min(runais, key=cpu.__getitem__) if runais else None
    lim = med["limit"]
    ra = med[runai_best] if runai_best else float("nan")
    ra_cpu = cpu[runai_frugal] if runai_frugal else float("nan")
    cmd = "sudo .venv/bin/python bench/bench_gpuload_s3.py " + " ".join(sys.argv[1:])
    lines = [
        "### from S3", "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"2-core VM, no GPU (as above). {versions(aws or 'aws')}.", "",
        (f"Command: `{cmd.strip()}` ({args.rounds} rounds, {elapsed:.0f} s in all, upload "
        f"included). File: {size / 2**30:.2f} GiB random bf16 (bench_p2pfs.make_safetensors), "
        f"one object on a local SeaweedFS (loopback, data on the same virtio disk). Every "
        f"measurement with the page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, "
        f"then {args.settle:g} s settle) and in a fresh process; same method order each round; "
        f"time = until every byte of every tensor was touched (gpuload._bench.touch; the limit "
        f"only receives the bytes). gpuload-p2pfs: `gpuload.load_file` on the file under a "
        f"p2pfs mount with a fresh `--cache-dir` each round (mount outside the timing): the "
        f"daemon fills gpuload's memory (`fill`); gpuload-p2pfs-fuse: the same with "
        f"`fill=False` (reads through FUSE with the prefetch hint); st-p2pfs: "
        f"`safetensors.torch.load_file` through the mount. Warm p2pfs: a new daemon on the "
        f"cache that round's cold gpuload-p2pfs filled. runai-s3 cN: `SafetensorsStreamer` on "
        f"the s3:// URL with `RUNAI_STREAMER_CONCURRENCY=N`. s3fs+load_file: s3fs-fuse "
        f"(`parallel_count=16`, `use_cache` in a fresh dir; warm: the same mount again). "
        f"aws-cp+load_file: `aws s3 cp` (default settings) to the local disk, then "
        f"`safetensors.torch.load_file` (warm: load_file of that file). CPU-s/GiB = user+system "
        f"seconds per GiB delivered, medians: loader = the loading process (RUSAGE_SELF, all "
        f"its threads); daemon = the p2pfs daemon or s3fs over the load (/proc), or the `aws` "
        f"child; write-back tail = the p2pfs daemon after the load returned until its cache "
        f"held the file (sealed); total = the three; daemon's trio thread = the daemon's main "
        f"thread, part of daemon; store = SeaweedFS, not counted."), "",
        *table(results, size, lim, ra, ra_cpu), "",
    ]
    summary: dict[str, float] = {}
    for name in ("gpuload-p2pfs", "gpuload-p2pfs-fuse", "st-p2pfs"):
        if name not in med:
            continue
        g = med[name]
        summary[f"{name}/limit"] = g / lim
        lines.append(f"- {name} / limit: **{g / lim:.2f}x**.")
        if runai_best:
            summary[f"{name}/runai"] = g / ra
            summary[f"{name}/runai_cpu"] = cpu[name] / ra_cpu
            lines.append(f"- {name} / Run:ai best ({runai_best}): **{g / ra:.2f}x** wall; client "
                         f"CPU per GiB / Run:ai's lowest ({runai_frugal}, {ra_cpu:.2f} s/GiB): "
                         f"**{cpu[name] / ra_cpu:.2f}x** (target <= 1: "
                         f"{'met' if cpu[name] <= ra_cpu else 'not met'}).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "command": cmd, "runs": results,
                                         "medians_s": med, "cpu_s_per_gib": cpu,
                                         "runai_best": runai_best, "runai_frugal": runai_frugal,
                                         "ratios": summary}, indent=1))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
