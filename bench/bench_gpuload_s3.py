"""gpuload from S3: through a p2pfs mount vs Run:ai Model Streamer's S3 backend vs `aws s3 cp`
then `safetensors.torch.load_file`, against the S3 limit, on one local SeaweedFS (loopback).

    sudo .venv/bin/python bench/bench_gpuload_s3.py [--size-gib 2] [--rounds 3] [--settle 3]
        [--runai-concurrency 8,16,32] [--methods limit,gpuload,...] [--json out.json]

One random bf16 safetensors file of ~size (bench_p2pfs.make_safetensors) is published with
`p2pfs publish`. Each round runs the methods in the same order, every one cold (`sync; echo 3 >
/proc/sys/vm/drop_caches`, then `--settle` seconds) and in a fresh process (this VM's cost of
fresh memory depends on what ran before; imports are outside the timing):

  limit            16 parallel 8 MiB ranged GETs into memory (bench_p2pfs.s3_limit), no disk
  gpuload-p2pfs    gpuload.load_file on the file under a p2pfs mount with a fresh --cache-dir
                   (mounted before the drop, outside the timing); the daemon writes the file
                   into gpuload's memory (the control socket's `fill`)
  gpuload-p2pfs-fuse  the same with fill=False: reads through FUSE with the prefetch hint
  runai-s3 cN      runai_model_streamer.SafetensorsStreamer on the s3:// URL,
                   RUNAI_STREAMER_CONCURRENCY=N, one entry per N (the issue asks for its best)
  aws-cp+load_file `aws s3 cp` (the CLI, default settings) to a local file, then
                   safetensors.torch.load_file on it

Timed until every byte of every tensor was touched (gpuload._bench.touch, the same for all);
the limit only receives the bytes (it is the bound, not a loader). The touch sums must agree.
Prints a Markdown subsection: medians, ratios to the limit and to Run:ai's best, raw runs.
Needs root (drop_caches, FUSE), weed, and the bench extra (runai-model-streamer-s3).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

BUCKET, KEY = "bench", "llama/model.safetensors"
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


# --- workers: one measurement each, in a fresh process; print {"seconds", "check"} ---------

def _touch(tensors) -> int:
    from gpuload import _bench

    return _bench.touch(tensors)


def work_limit(a: argparse.Namespace) -> dict:
    from bench_p2pfs import s3_limit

    return {"seconds": asyncio.run(s3_limit(a.endpoint, BUCKET, KEY, a.size)), "check": None}


def work_gpuload(a: argparse.Namespace) -> dict:
    import gpuload

    t0 = time.perf_counter()
    sd = gpuload.load_file(a.path, device="cpu", fill=bool(a.fill))
    check = _touch(sd.values())
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


WORKERS = {"limit": work_limit, "gpuload": work_gpuload, "runai": work_runai, "awscp": work_awscp}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=WORKERS, required=True)
    ap.add_argument("--endpoint", default="")
    ap.add_argument("--path", default="")
    ap.add_argument("--aws", default="aws")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--fill", type=int, default=1)
    a = ap.parse_args(argv)
    print(json.dumps(WORKERS[a.worker](a)))
    return 0


# --- the driver -----------------------------------------------------------------------------

def drop_caches(settle: float) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(settle)


def run_worker(kind: str, env: dict[str, str], **kw: object) -> dict:
    args = [sys.executable, __file__, "--worker", kind]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode:
        raise RuntimeError(f"{kind} worker failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def publish_model(sw, work: Path, size_gib: float, env: dict[str, str], log=print) -> int:
    """Create the bucket on a started SeaweedFS, write one random bf16 file of ~size_gib
    and `p2pfs publish` it as s3://BUCKET/KEY; the local copy is removed. Its size."""
    from bench_p2pfs import make_safetensors

    sw.create_bucket(BUCKET)
    src = work / "src" / "llama"
    src.mkdir(parents=True)
    make_safetensors(src / "model.safetensors", int(size_gib * (1 << 30)))
    size = (src / "model.safetensors").stat().st_size
    log(f"file: {size / 2**30:.2f} GiB; publishing ...")
    p2pfs("publish", src, f"s3://{BUCKET}/llama", env=env)
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
    weed = subprocess.run([_weed(), "version"], capture_output=True, text=True,
                          check=False).stdout.split()
    out.append(f"SeaweedFS {weed[2] if len(weed) > 2 else '?'}")
    return ", ".join(out)


def _weed() -> str:
    from p2pfs.seaweed import find_weed

    return find_weed()


def table(res: dict[str, list[float]], nbytes: int, limit: float, runai: float) -> list[str]:
    rows = ["| method | median s | GB/s | x limit | x Run:ai best | runs (s) |",
            "|---|---:|---:|---:|---:|---|"]
    for m, runs in res.items():
        med = statistics.median(runs)
        rows.append(f"| {m} | {med:.3f} | {nbytes / med / 1e9:.2f} | {med / limit:.2f} | "
                    f"{med / runai:.2f} | {', '.join(f'{x:.3f}' for x in runs)} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--runai-concurrency", default="8,16,32",
                    help="comma-separated RUNAI_STREAMER_CONCURRENCY values, each a method")
    ap.add_argument("--json", type=Path, help="Write raw results here.")
    ap.add_argument("--methods", default="limit,gpuload,gpuload-fuse,runai,awscp",
                    help="comma-separated subset to run (the limit always runs)")
    args = ap.parse_args()
    methods = set(args.methods.split(",")) | {"limit"}
    if os.geteuid() != 0:
        print("bench_gpuload_s3: needs root (drop_caches, FUSE)", file=sys.stderr)
        return 2
    aws = shutil.which("aws")
    if aws is None:
        print("bench_gpuload_s3: needs the `aws` CLI on PATH", file=sys.stderr)
        return 2
    concurrencies = [int(c) for c in args.runai_concurrency.split(",") if c]

    from p2pfs.seaweed import SeaweedServer

    # weed takes its S3 identity from the environment it starts in.
    os.environ.update(CREDS)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpuload-s3-bench-", dir="/var/tmp"))
    sw = SeaweedServer(work / "sw")
    mnt = work / "mnt"
    mnt.mkdir()
    mounted = False
    results: dict[str, list[float]] = {}
    checks: dict[str, set[int]] = {}
    t_start = time.time()
    failed = True
    try:
        sw.start()
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        size = publish_model(sw, work, args.size_gib, env, log)
        target = mnt / KEY
        download = work / "download.safetensors"

        def record(name: str, r: dict) -> None:
            results.setdefault(name, []).append(r["seconds"])
            if r["check"] is not None:
                checks.setdefault(name, set()).add(r["check"])
            log(f"  {name:18s} {r['seconds']:7.3f} s  {size / r['seconds'] / 1e9:5.2f} GB/s")

        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            drop_caches(args.settle)
            record("limit", run_worker("limit", env, endpoint=sw.endpoint, size=size))

            for name, fill in (("gpuload-p2pfs", 1), ("gpuload-p2pfs-fuse", 0)):
                if (name == "gpuload-p2pfs" and "gpuload" not in methods
                        or name == "gpuload-p2pfs-fuse" and "gpuload-fuse" not in methods):
                    continue
                cache = work / f"cache{rnd}"
                p2pfs("mount", f"s3://{BUCKET}", mnt, "--cache-dir", cache, "--json",
                      "--log-file", work / f"p2pfs-{rnd}.log", env=env)
                mounted = True
                drop_caches(args.settle)
                record(name, run_worker("gpuload", env, path=target, fill=fill))
                st = json.loads(p2pfs("status", "--json", mnt, env=env))
                if st["bytes_by_source"].get("origin", 0) < size:
                    raise RuntimeError(f"cold p2pfs load not from S3: {st['bytes_by_source']}")
                if (st["fill_bytes"] >= size) != bool(fill):
                    raise RuntimeError(f"{name}: fill_bytes {st['fill_bytes']} (fill={fill})")
                # Let the write-back to the cache dir finish before the next method.
                while json.loads(p2pfs("status", "--json", mnt, env=env))["writeback_pending"]:
                    time.sleep(0.2)
                p2pfs("unmount", mnt, env=env)
                mounted = False
                shutil.rmtree(cache)

            for c in concurrencies if "runai" in methods else ():
                drop_caches(args.settle)
                record(f"runai-s3 c{c}", run_worker("runai", runai_env(env, sw.endpoint, c)))

            if "awscp" in methods:
                drop_caches(args.settle)
                record("aws-cp+load_file",
                       run_worker("awscp", env, endpoint=sw.endpoint, path=download, aws=aws))
                download.unlink()
        failed = False
    finally:
        if mounted:
            try:
                p2pfs("unmount", mnt, env=env)
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

    if len({c for s in checks.values() for c in s}) != 1:
        raise RuntimeError(f"methods disagree on the bytes: {checks}")
    med = {m: statistics.median(v) for m, v in results.items()}
    runais = [m for m in med if m.startswith("runai-s3")]
    runai_best = min(runais, key=med.__getitem__) if runais else None
    lim = med["limit"]
    ra = med[runai_best] if runai_best else float("nan")
    cmd = "sudo .venv/bin/python bench/bench_gpuload_s3.py " + " ".join(sys.argv[1:])
    lines = [
        "### from S3", "",
        f"Date: {datetime.date.today()}. Machine: 2-core VM, no GPU (as above). {versions(aws)}.",
        "",
        (f"Command: `{cmd.strip()}` ({args.rounds} rounds, {elapsed:.0f} s in all, upload "
        f"included). File: {size / 2**30:.2f} GiB random bf16 (bench_p2pfs.make_safetensors), "
        f"one object on a local SeaweedFS (loopback, data on the same virtio disk). Every "
        f"measurement cold (`sync; echo 3 > /proc/sys/vm/drop_caches`, then {args.settle:g} s "
        f"settle) and in a fresh process; same method order each round; time = until every "
        f"byte of every tensor was touched (gpuload._bench.touch; the limit only receives the "
        f"bytes). gpuload-p2pfs: `gpuload.load_file` on the file under a p2pfs mount with a "
        f"fresh `--cache-dir` each round (mount outside the timing): the daemon fills "
        f"gpuload's memory (`fill`); gpuload-p2pfs-fuse: the same with `fill=False` (reads "
        f"through FUSE with the prefetch hint). runai-s3 cN: `SafetensorsStreamer` on the "
        f"s3:// URL with `RUNAI_STREAMER_CONCURRENCY=N`. aws-cp+load_file: `aws s3 cp` "
        f"(default settings) to the local disk, then `safetensors.torch.load_file`."), "",
        *table(results, size, lim, ra), "",
    ]
    summary: dict[str, float] = {}
    for name in ("gpuload-p2pfs", "gpuload-p2pfs-fuse"):
        if name not in med:
            continue
        g = med[name]
        summary[f"{name}/limit"] = g / lim
        lines.append(f"- {name} / limit: **{g / lim:.2f}x** "
                     f"(target <= 1.2x: {'met' if g / lim <= 1.2 else 'not met'}).")
        if runai_best:
            summary[f"{name}/runai"] = g / ra
            lines.append(f"- {name} / Run:ai best ({runai_best}): **{g / ra:.2f}x** "
                         f"(target <= 0.8x: {'met' if g / ra <= 0.8 else 'not met'}).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "runs_s": results, "medians_s": med,
                                         "runai_best": runai_best, "ratios": summary},
                                        indent=1))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
