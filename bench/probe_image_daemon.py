"""Probe: what a p2pfs daemon does during one cold container start (bench/RESULTS.md,
"Images: the daemon's work during a cold start").

    sudo .venv/bin/python bench/probe_image_daemon.py [--image torch-serve] [--rounds 8]
         [--ab "[cache]\\nwriteback_idle_cpus = 0\\n"] [--ab-snapshotter "--no-erofs"] [--perf] [--py-spy] [--again]

Runs bench_images' `p2pfs-prefetch` variant (a fresh node on a converted prefix with
recorded start-up lists) ROUNDS times; with --ab, odd rounds merge that TOML over the node's
config (an A/B comparison of settings in one run, interleaved); --ab-snapshotter gives odd
rounds' snapshotter those options (e.g. --no-erofs: layers through the FUSE dirs). Per round: time to first
output, the daemon's, SeaweedFS's, the snapshotter's and containerd's CPU seconds
(user+system, /proc) and all CPUs' busy seconds (/proc/stat) over pull + run, write-back
done and pending and the origin's GETs and MB at the first output, and the same at exit;
FUSE requests by operation once.
--perf records the daemon with `perf record -g` (files under /tmp/probe-image-daemon/).
--py-spy records its Python stacks (py-spy, every thread, idle ones left out; collapsed
stacks in /tmp/probe-image-daemon/ROUND.pyspy, and the top functions by own samples
printed): `pip install py-spy` into the venv first.
--again starts a second container from the image on the same node after each round (a
replica restarting, or a second one on a node that ran one) and prints its time to first
output and the FUSE requests it alone sent; --again-cold drops the page cache before it
(everything then comes from p2pfs's disk cache: bench_coldstart's p2pfs-warm).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import bench_images as B  # noqa: E402
from image_helpers import RegistryServer  # noqa: E402
from images import build_image, push_bench_images  # noqa: E402

OUT = Path("/tmp/probe-image-daemon")


def daemon_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def store_cpu() -> float:
    """The object store's (SeaweedFS's) CPU-seconds so far; 0 before it runs."""
    store = B._STORE
    return daemon_cpu(store.server.proc.pid) if store is not None and store.server.proc else 0.0


def origin_counts(st: dict) -> dict:
    """The origin's GETs and MB so far, from a daemon status."""
    return {"origin_requests": st.get("origin_requests"),
            "origin_mb": round((st.get("bytes_by_source") or {}).get("origin", 0) / 1e6, 1)}


def top_functions(collapsed: Path, n: int = 25) -> None:
    """Print the functions with the most samples of their own (leaf frames) and the most
    samples below them (inclusive), from py-spy's collapsed stacks."""
    from collections import Counter

    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # Frames are "function (file:line)"; drop the line (a function's samples together)
        # and the frames naming the process and the thread.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread ("))]
        total += int(count)
        if frames:
            own[frames[-1]] += int(count)
        for f in set(frames):
            inclusive[f] += int(count)
    print(f"py-spy {collapsed.name}: {total} samples")
    for title, counter in (("own", own), ("inclusive", inclusive)):
        for f, c in counter.most_common(n):
            print(f"  {title:9} {100 * c / max(total, 1):5.1f}%  {f}")


def timeline(w0: float, sample, logs: dict[str, str]) -> None:
    """Log lines stamped after w0 (the pull's start), as seconds from it, in time order."""
    import datetime

    rows = []
    for who, text in logs.items():
        for line in text.splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)", line)
            if not m:
                continue
            t = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
            if t >= w0 - 0.001:
                rows.append((t - w0, who, m[3][:160]))
    rows.append((sample.extra["pull_seconds"], "bench", "pull done"))
    rows.append((sample.seconds_to_first_output, "bench", "first output"))
    for t, who, text in sorted(rows):
        print(f"  {t:7.3f}  {who:11} {text}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="torch-serve")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ab", default="", help="TOML merged over the config of odd rounds")
    ap.add_argument("--ab-snapshotter", dest="ab_snapshotter", default="", metavar="ARGS",
                    help="options given to the snapshotter of odd rounds, e.g. '--no-erofs'")
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--py-spy", dest="py_spy", action="store_true")
    ap.add_argument("--again", action="store_true",
                    help="a second container on the same node after each round")
    ap.add_argument("--timeline", action="store_true",
                    help="print the snapshotter's and the daemon's log lines of the timed start, "
                         "as seconds from the pull")
    ap.add_argument("--again-cold", dest="again_cold", action="store_true",
                    help="with --again: drop the page cache first (what is left is p2pfs's disk cache)")
    args = ap.parse_args()
    nodes: list = []
    init = B.P2pfsNode.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        nodes.append(self)

    B.P2pfsNode.__init__ = remember
    run = B._pull_and_run

    def measured(bench, node, image, ref, cid, snap, meter=None):
        n = nodes[-1]
        if "prefetch" not in cid:
            return run(bench, node, image, ref, cid, snap, meter)
        OUT.mkdir(exist_ok=True)
        perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(n.mount.pid), "-o",
                                 str(OUT / f"{cid}.perf")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) if args.perf else None
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200",
                                "--threads", "--nonblocking", "-f", "raw", "-p", str(n.mount.pid),
                                "-o", str(OUT / f"{cid}.pyspy")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) if args.py_spy else None
        at_first = {}

        def meter_first():
            st = n.mount.status()
            at_first.update(done=st["writeback_done"], pending=st["writeback_pending"],
                            **origin_counts(st))
            return meter()

        others = {"snapshotter": n.snapshotter.proc, "containerd": n.containerd.proc}
        o0 = {k: daemon_cpu(p.pid) for k, p in others.items() if p is not None}
        c0, w0, m0, st0 = daemon_cpu(n.mount.pid), time.time(), machine_busy(), store_cpu()
        s = run(bench, node, image, ref, cid, snap, meter_first if meter else None)
        machine, store = machine_busy() - m0, store_cpu() - st0
        other_cpu = {f"{k}_cpu_s": round(daemon_cpu(others[k].pid) - v, 2) for k, v in o0.items()}
        if args.timeline:
            timeline(w0, s, {"snapshotter": n.snapshotter.log_text(),
                             "daemon": (n.cache / "p2pfs.log").read_text(errors="replace")})
        cpu = daemon_cpu(n.mount.pid) - c0
        if perf:
            perf.send_signal(2)
            perf.wait()
        if spy:
            spy.send_signal(2)
            spy.wait()
            top_functions(OUT / f"{cid}.pyspy")
        st = n.mount.status()
        conf = "B" if os.environ.get("P2PFS_BENCH_TOML") or os.environ.get(
            "P2PFS_BENCH_SNAPSHOTTER_ARGS") else "A"
        print(json.dumps({"round": cid, "conf": conf,
                          "first_output_s": round(s.seconds_to_first_output, 2),
                          "daemon_cpu_s": round(cpu, 2), "store_cpu_s": round(store, 2),
                          **other_cpu,
                          "machine_busy_cpu_s": round(machine, 2),
                          "writeback_at_first_output": at_first,
                          "writeback_done": st["writeback_done"],
                          "writeback_dropped": st["writeback_dropped"],
                          **origin_counts(st),
                          "fuse_ops": st.get("fuse_ops")}), flush=True)
        if args.again:
            if args.again_cold:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3")
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200",
                                    "--threads", "--nonblocking", "-f", "raw", "-p", str(n.mount.pid),
                                    "-o", str(OUT / f"{cid}-again.pyspy")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) if args.py_spy else None
            c0, ops0 = daemon_cpu(n.mount.pid), st.get("fuse_ops") or {}
            again = run(bench, node, image, ref, f"{cid}-again", snap, meter)
            ops = n.mount.status().get("fuse_ops") or {}
            if spy:
                spy.send_signal(2)
                spy.wait()
                top_functions(OUT / f"{cid}-again.pyspy")
            print(json.dumps({"round": f"{cid}-again",
                              "first_output_s": round(again.seconds_to_first_output, 2),
                              "daemon_cpu_s": round(daemon_cpu(n.mount.pid) - c0, 2),
                              "fuse_ops": {k: v - ops0.get(k, 0) for k, v in ops.items()
                                           if v != ops0.get(k, 0)}}), flush=True)
        return s

    B._pull_and_run = measured
    images = {args.image: build_image(args.image)}
    workdir = Path(tempfile.mkdtemp(prefix="p2pfs-probe-", dir="/var/tmp"))
    (workdir / "nodes").mkdir()
    registry = RegistryServer(workdir / "registry").start()
    try:
        refs = push_bench_images(registry, images)
        bench = B.Bench(workdir=workdir, node_dir=workdir / "nodes", registry=registry, relay=None)
        for r in range(args.rounds):
            os.environ["P2PFS_BENCH_TOML"] = args.ab if args.ab and r % 2 else ""
            os.environ["P2PFS_BENCH_SNAPSHOTTER_ARGS"] = args.ab_snapshotter if r % 2 else ""
            os.sync()
            B.p2pfs_lazy_prefetch(bench, images[args.image], refs[args.image], r)
    finally:
        B.close_store()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (containerd, FUSE)")
    main()
