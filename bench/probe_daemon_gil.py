"""Where the p2pfs daemon holds the GIL during a cold load: py-spy's GIL-holder samples,
split between the trio thread (FUSE handlers, the store's bookkeeping, the control
socket) and the worker threads (trio.to_thread: receives, sha256/xxh3, disk I/O), per GiB
delivered; with the daemon's CPU per thread from /proc (issue 10, item 3: what caps the
daemon's throughput on a many-core node).

    sudo .venv/bin/python bench/probe_daemon_gil.py [--size-gib 2] [--rate 400] \
        [--variants fill,fuse,st] [--top 12] [--json out.json]

Each variant: a fresh mount on an empty cache, the page cache dropped, then `py-spy record
--gil --threads --nonblocking` on the daemon while one cold load runs in a fresh process
(bench_gpuload_s3's worker: fill = gpuload with `fill`, fuse = gpuload through FUSE with the
prefetch hint, st = safetensors.torch.load_file through FUSE), until the load returns (its
write-back tail is not in it). GIL seconds = a thread's GIL-holding samples / all sampling
passes x the profile's duration; the passes are counted by a second sampler that keeps
idle threads too, so a sampler falling behind on this busy VM does not skew it.
`--nonblocking` does not stop the daemon to sample it, so a few stacks are torn; the split
between threads is what this reads. A thread descheduled while it holds the GIL counts as
holding it (on 2 shared cores, that happens). An exploration tool (one load per variant),
not a benchmark. Needs root, FUSE, weed and py-spy (in .venv).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gpuload_s3 import (  # noqa: E402
    BUCKET, CREDS, KEY, drop_caches, p2pfs, proc_cpu, publish_model, run_worker)

from p2pfs.seaweed import SeaweedServer  # noqa: E402

VARIANTS = {"fill": ("gpuload", {"fill": 1}), "fuse": ("gpuload", {"fill": 0}),
            "st": ("st", {})}
_THREAD = re.compile(r"^thread \((\d+)\)")


def parse(raw: str, trio_tid: int) -> tuple[collections.Counter, dict[str, collections.Counter],
                                           collections.Counter]:
    """GIL samples per thread kind ("trio", "workers"); per kind, the samples per innermost
    frame (self); and the trio thread's samples per p2pfs function anywhere on its stack
    (inclusive)."""
    per: collections.Counter = collections.Counter()
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        m = _THREAD.match(stack)
        if not m or not n.isdigit():
            continue
        kind = "trio" if int(m.group(1)) == trio_tid else "workers"
        per[kind] += int(n)
        frames = stack.split(";")[1:]  # after "thread (tid): name"
        own[kind][frames[-1] if frames else "?"] += int(n)
        if kind == "trio":
            # Our functions anywhere on the stack (any line of them), under which the
            # trio thread spent its GIL time.
            for f in {re.sub(r":\d+\)$", ")", f) for f in frames if "p2pfs/" in f}:
                incl[f] += int(n)
    return per, own, incl


class KernelStates:
    """Samples the trio thread's scheduler state and kernel wait channel from /proc (what
    it waits on when py-spy says it holds the GIL but /proc says it is not running)."""

    def __init__(self, pid: int, rate: int) -> None:
        self.base, self.period = f"/proc/{pid}/task/{pid}", 1 / rate
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "KernelStates":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                state = Path(f"{self.base}/stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = Path(f"{self.base}/wchan").read_text() or "-"
            except OSError:
                return
            self.counts[f"{state} {wchan if state != 'R' else ''}".strip()] += 1


def profile(variant: str, work: Path, env: dict[str, str], size: int, rate: int) -> dict:
    kind, kw = VARIANTS[variant]
    mnt, cache = work / "mnt", work / f"cache-{variant}"
    p2pfs("mount", f"s3://{BUCKET}", mnt, "--cache-dir", cache, "--json", "--log-file",
          work / "p2pfs.log", env=env)
    try:
        pid = json.loads(p2pfs("status", "--json", mnt, env=env))["pid"]
        drop_caches(3)
        out, clock = work / f"spy-{variant}.txt", work / f"spy-{variant}-idle.txt"
        # Two samplers at the same rate: one keeps only the GIL's holder, the other every
        # thread, idle ones too, so its count for the trio thread is the number of passes
        # (py-spy's own count is of the samples it kept).
        spies = [subprocess.Popen([str(HERE.parent / ".venv/bin/py-spy"), "record", "--pid",
                                   str(pid), flag, "--threads", "--nonblocking", "--format",
                                   "raw", "--rate", str(rate), "-o", str(path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for flag, path in (("--gil", out), ("--idle", clock))]
        time.sleep(1.0)  # py-spy attaches
        d0, t0, w0 = proc_cpu(pid), proc_cpu(pid, pid), time.monotonic()
        with KernelStates(pid, 100) as states:
            r = run_worker(kind, env, path=mnt / KEY, **kw)
        d1, t1, w1 = proc_cpu(pid), proc_cpu(pid, pid), time.monotonic()
        for spy in spies:  # the load only: polling `status` would be sampled too
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)
        while json.loads(p2pfs("status", "--json", mnt, env=env))["writeback_pending"]:
            time.sleep(0.2)
        per, own, incl = parse(out.read_text(), pid)
        passes = parse(clock.read_text(), pid)[0]["trio"]
    finally:
        p2pfs("unmount", mnt, env=env)
        shutil.rmtree(cache, ignore_errors=True)
    # The profile ran from py-spy's start (1 s before the load) until SIGINT: its passes
    # are spread over that whole span.
    span = (w1 - w0) + 1.0
    gib = size / 2**30
    return {"variant": variant, "load_s": r["seconds"], "span_s": span, "passes": passes,
            "gil_trio_s": per["trio"] / passes * span, "gil_workers_s": per["workers"] / passes * span,
            "cpu_daemon_s": d1 - d0, "cpu_trio_s": t1 - t0, "gib": gib,
            "trio_samples": per["trio"], "trio_self": own["trio"].most_common(40),
            "trio_inclusive": incl.most_common(60), "workers_samples": per["workers"],
            "workers_self": own["workers"].most_common(40),
            "trio_kernel_states": states.counts.most_common(12)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--variants", default="fill,fuse,st")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("probe_daemon_gil: needs root (drop_caches, FUSE, ptrace)", file=sys.stderr)
        return 2
    os.environ.update(CREDS)
    work = Path(tempfile.mkdtemp(prefix="probe-gil-", dir="/var/tmp"))
    (work / "mnt").mkdir()
    sw = SeaweedServer(work / "sw")
    results = []
    try:
        sw.start()
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        size = publish_model(sw, work, args.size_gib, env,
                             lambda s: print(s, file=sys.stderr, flush=True))
        for v in args.variants.split(","):
            results.append(profile(v, work, env, size, args.rate))
            print(f"{v}: done", file=sys.stderr, flush=True)
    finally:
        if os.path.ismount(work / "mnt"):
            p2pfs("unmount", work / "mnt", env=dict(os.environ))
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("| load | wall s | daemon CPU-s/GiB | of it trio thread | GIL-s/GiB trio thread "
          "| GIL-s/GiB worker threads | GIL-s/GiB all |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        g = r["gib"]
        print(f"| {r['variant']} | {r['load_s']:.2f} | {r['cpu_daemon_s'] / g:.2f} | "
              f"{r['cpu_trio_s'] / g:.2f} | {r['gil_trio_s'] / g:.2f} | "
              f"{r['gil_workers_s'] / g:.2f} | {(r['gil_trio_s'] + r['gil_workers_s']) / g:.2f} |")
    for r in results:
        for who, what in (("trio", "self"), ("trio", "inclusive"), ("workers", "self")):
            total = r[f"{who}_samples"] or 1
            print(f"\n{r['variant']}: GIL samples of the {who} thread(s), {what}, top {args.top}:")
            for frame, n in r[f"{who}_{what}"][:args.top]:
                print(f"  {n / total:5.1%}  {frame}")
        total = sum(n for _, n in r["trio_kernel_states"]) or 1
        print(f"\n{r['variant']}: the trio thread's state (/proc, 100 Hz; R = running or "
              "runnable):")
        for state, n in r["trio_kernel_states"]:
            print(f"  {n / total:5.1%}  {state}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
