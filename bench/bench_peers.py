"""Peers: N nodes cold-loading one model at once, peers off vs on, behind a shaped store.

    sudo .venv/bin/python bench/bench_peers.py [--nodes 2,4] [--size-mib 1024] [--repeat 3]
        [--store-gbit 1] [--modes off,on] [--no-verify] [--json out.json]

Everything runs in one private network namespace (`p2pfs-bench-<pid>`, its `lo` up), so
the host's loopback is never shaped: one SeaweedFS on 127.0.0.1, a counting relay
(tests/peer_helpers.StoreRelay) on 127.0.0.2 in front of its S3 port (the store's
address the nodes use), node i on 127.0.0.(10+i). htb on the namespace's `lo` shapes
every packet from 127.0.0.2 to --store-gbit (the cloud object store's bottleneck), the
rest to 100 Gbit/s. The driver re-runs itself under `nsenter --net` (the host's mount
namespace, so the FUSE mounts stay visible and unmountable from here).

One random bf16 safetensors file (bench_p2pfs.make_safetensors) is published once. Each
repeat runs, in this order: one node alone (the reference), then for each N: N nodes
with peers off (the Nx baseline), N nodes with peers on. Every run has fresh daemons and
cache dirs (mounted outside the timing), the page cache dropped, then every node reads
the whole file (8 MiB read()s, no hashing) with all readers released at one instant.
Per run: wall time of the slowest node, origin bytes counted at the store's side (the
relay's payload bytes; the htb class's bytes as a cross-check), bytes by source from
each daemon's `p2pfs status --json`. With verify (default) every node then re-reads the
file hashing it, and the sha256 must be the published file's. Medians over --repeat.
Targets: origin <= 1.05x the model at every N with peers; the slowest node with peers
<= 1.3x one node alone. Needs root, /dev/fuse, ip, tc, nsenter.

Cleanup, whatever happens (try/finally and atexit): the daemons and SeaweedFS by PID
(the inner driver writes every PID it starts to a file the outer one reads), mounts
under the work dir, the qdisc and the namespace by name.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

MiB = 1 << 20
STORE_ADDR = "127.0.0.2"
BUCKET, KEY = "bench", "llama/model.safetensors"
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
#: Targets of issue 8, item 9.
ORIGIN_TARGET = 1.05
SLOWEST_TARGET = 1.3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the outer driver: the namespace and the shaping, created and always removed ----------

def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def make_netns(name: str, store_gbit: float) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    tc = ("tc", "-n", name)
    store = f"{store_gbit * 1000:g}mbit"
    sh(*tc, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "20")
    sh(*tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb",
       "rate", "100gbit", "quantum", "65536")
    # A burst of a few 64 KiB loopback super-packets, else htb undershoots its rate.
    sh(*tc, "class", "add", "dev", "lo", "parent", "1:1", "classid", "1:10", "htb", "rate", store,
       "ceil", store, "burst", "256k", "cburst", "256k", "quantum", "65536")
    sh(*tc, "class", "add", "dev", "lo", "parent", "1:1", "classid", "1:20", "htb",
       "rate", "100gbit", "ceil", "100gbit", "quantum", "65536")
    sh(*tc, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
       "match", "ip", "src", f"{STORE_ADDR}/32", "flowid", "1:10")


class Cleanup:
    """Idempotent: leftover processes by PID, mounts under the work dir, the qdisc and
    the namespace by name, the work dir."""

    def __init__(self, name: str, work: Path) -> None:
        self.name, self.work, self.done = name, work, False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        pids = self.work / "pids"
        for line in pids.read_text().split() if pids.exists() else ():
            pid = int(line)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"p2pfs" in cmd or b"weed" in cmd:  # ours, not a reused PID
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mnt = line.split()[1]
            if mnt.startswith(str(self.work) + "/"):
                sh("umount", "-l", mnt, check=False)
        if Path(f"/run/netns/{self.name}").exists():
            sh("tc", "-n", self.name, "qdisc", "del", "dev", "lo", "root", check=False)
            sh("ip", "netns", "del", self.name, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def outer_main(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        log("bench_peers: needs root and /dev/fuse")
        return 2
    for tool in ("ip", "tc", "nsenter"):
        if not shutil.which(tool):
            log(f"bench_peers: needs `{tool}`")
            return 2
    name = f"p2pfs-bench-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="p2pfs-peers-bench-", dir="/var/tmp"))
    cleanup = Cleanup(name, work)
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so finally and atexit run
    result = work / "result.json"
    inner = None
    try:
        make_netns(name, args.store_gbit)
        cmd = ["nsenter", f"--net=/run/netns/{name}", sys.executable, __file__, "--inner",
               str(work), *argv]
        inner = subprocess.Popen(cmd, env=dict(os.environ, **CREDS))
        rc = inner.wait()
        if rc or not result.exists():
            log(f"bench_peers: the inner driver failed ({rc})")
            return rc or 1
        out = json.loads(result.read_text())
    finally:
        if inner is not None and inner.poll() is None:  # let it stop its own daemons first
            inner.terminate()
            try:
                inner.wait(60)
            except subprocess.TimeoutExpired:
                inner.kill()
                inner.wait()
        cleanup()
    print(out["markdown"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["targets_met"] is not False else 3


# --- the inner driver: inside the namespace ---------------------------------------------

def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def htb_store_bytes() -> int:
    """Bytes the shaped class (packets from the store's address) has sent, headers included."""
    out = sh("tc", "-s", "class", "show", "dev", "lo").stdout
    m = re.search(r"class htb 1:10 .*?\n\s*Sent (\d+) bytes", out)
    return int(m.group(1)) if m else 0


def publish(sw, work: Path, size: int, env: dict[str, str]) -> tuple[int, str]:
    """Write one random bf16 file of ~size bytes, publish it; (its size, its sha256)."""
    from bench_gpuload_s3 import p2pfs
    from bench_p2pfs import make_safetensors

    sw.create_bucket(BUCKET)
    src = work / "src" / "llama"
    src.mkdir(parents=True)
    make_safetensors(src / "model.safetensors", size)
    data = src / "model.safetensors"
    h = hashlib.sha256()
    with open(data, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    p2pfs("publish", src, f"s3://{BUCKET}/llama", env=env)
    nbytes = data.stat().st_size
    shutil.rmtree(work / "src")
    return nbytes, h.hexdigest()


def note_pids(work: Path, *pids: int) -> None:
    """For the outer driver's cleanup: every process the inner one starts."""
    with open(work / "pids", "a") as f:
        f.write("".join(f"{p}\n" for p in pids))


class Runner:
    def __init__(self, work: Path, relay, size: int, sha: str, args: argparse.Namespace) -> None:
        self.work, self.relay, self.size, self.sha, self.args = work, relay, size, sha, args
        self.timeout = 120 + 4 * size * 8 / (args.store_gbit * 1e9) * max(args.nodes)

    def run(self, label: str, n: int, peers: bool) -> dict:
        from peer_helpers import Cluster, Readers, bytes_by_source, read_all_nodes

        base = self.work / label
        c = Cluster(f"s3://{BUCKET}", self.relay.endpoint, base, n, peers=peers)
        try:
            c.start()
            note_pids(self.work, *(m.pid for m in c.nodes))
            drop_caches()
            paths = [c.path(i, KEY) for i in range(n)]
            readers = Readers(paths, hash=False)
            try:
                self.relay.reset()
                htb0 = htb_store_bytes()
                t_go = readers.go()
                reads = readers.wait(self.timeout)
            finally:
                readers.kill()
            origin, htb = self.relay.egress, htb_store_bytes() - htb0
            statuses = c.statuses()
            bad = [r for r in reads if not r.ok or r.n != self.size]
            if bad:
                raise RuntimeError(f"{label}: reads failed: {bad}")
            if self.args.verify:
                for r in read_all_nodes(paths, timeout=self.timeout, hash=True):
                    if not r.ok or r.sha256 != self.sha:
                        raise RuntimeError(f"{label}: wrong bytes at {r.path}: {r}")
        finally:
            c.stop()
        shutil.rmtree(base, ignore_errors=True)  # kept on failure: the daemons' logs
        by_node = [dict(s.get("bytes_by_source") or {}) for s in statuses]
        peer_st = [s.get("peers") or {} for s in statuses]
        res = {"label": label, "nodes": n, "peers": peers,
               "slowest_s": max(r.t1 for r in reads) - t_go,
               "node_s": [round(r.t1 - t_go, 3) for r in reads],
               "origin_bytes": origin, "origin_htb_bytes": htb,
               "bytes_by_source": bytes_by_source(statuses), "bytes_by_source_per_node": by_node,
               "hedges": sum(p.get("hedges", 0) for p in peer_st),
               "hedge_wins": sum(p.get("hedge_wins", 0) for p in peer_st)}
        log(f"  {label:12s} slowest {res['slowest_s']:7.2f} s  origin {origin / self.size:5.2f}x "
            f"(htb {htb / self.size:5.2f}x)  hedges {res['hedges']}  by source "
            + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in sorted(res["bytes_by_source"].items())))
        return res


def configs(args: argparse.Namespace, have_peers: bool) -> list[tuple[str, int, bool]]:
    out = [("alone", 1, False)]
    for n in args.nodes:
        if "off" in args.modes:
            out.append((f"n{n}-off", n, False))
        if "on" in args.modes and have_peers:
            out.append((f"n{n}-on", n, True))
    return out


def summarize(runs: list[dict], size: int) -> dict[str, dict]:
    med: dict[str, dict] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        keys = sorted({k for r in rs for k in r["bytes_by_source"]})
        med[label] = {
            "nodes": rs[0]["nodes"], "peers": rs[0]["peers"], "repeats": len(rs),
            "slowest_s": statistics.median(r["slowest_s"] for r in rs),
            "origin_bytes": statistics.median(r["origin_bytes"] for r in rs),
            "origin_x_model": statistics.median(r["origin_bytes"] for r in rs) / size,
            "origin_htb_x_model": statistics.median(r["origin_htb_bytes"] for r in rs) / size,
            "hedges": statistics.median(r["hedges"] for r in rs),
            "bytes_by_source": {k: statistics.median(r["bytes_by_source"].get(k, 0) for r in rs)
                                for k in keys},
        }
    return med


def targets(med: dict[str, dict], nodes: list[int]) -> tuple[list[dict], bool | None]:
    rows = []
    alone = med["alone"]["slowest_s"]
    for n in nodes:
        off, on = med.get(f"n{n}-off"), med.get(f"n{n}-on")
        if off:
            rows.append({"target": f"N={n} peers off: origin ~{n}x (the baseline)",
                         "value": round(off["origin_x_model"], 3), "met": off["origin_x_model"] >= 0.9 * n})
        if on:
            rows.append({"target": f"N={n} peers on: origin <= {ORIGIN_TARGET}x the model",
                         "value": round(on["origin_x_model"], 3),
                         "met": on["origin_x_model"] <= ORIGIN_TARGET})
            rows.append({"target": f"N={n} peers on: slowest node <= {SLOWEST_TARGET}x one node alone",
                         "value": round(on["slowest_s"] / alone, 3),
                         "met": on["slowest_s"] / alone <= SLOWEST_TARGET})
        else:
            rows.append({"target": f"N={n} peers on: origin <= {ORIGIN_TARGET}x, slowest <= "
                                   f"{SLOWEST_TARGET}x alone", "value": None, "met": None})
    judged = [r["met"] for r in rows if r["met"] is not None]
    return rows, (all(judged) if judged else None)


def markdown(args, argv, size, med, rows, runs, elapsed, note: str) -> str:
    alone = med["alone"]["slowest_s"]
    cpu = platform.processor() or platform.machine()
    lines = [
        "### bench_peers", "",
        f"Date: {datetime.date.today()}. Machine: {os.cpu_count()} cores ({cpu}), "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, no GPU. "
        f"Python {platform.python_version()}.", "",
        f"Command: `sudo .venv/bin/python bench/bench_peers.py {' '.join(argv)}` "
        f"({elapsed:.0f} s in all). File: {size / MiB:.0f} MiB random bf16, store egress shaped "
        f"to {args.store_gbit:g} Gbit/s (htb on a private namespace's lo), everything else 100 "
        f"Gbit/s; medians of {args.repeat}. {note}", "",
        "| run | nodes | peers | slowest node s | x alone | origin x model (relay / htb) | "
        "hedges | bytes by source, all nodes (MiB) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for label, m in med.items():
        src = ", ".join(f"{k} {v / MiB:.0f}" for k, v in m["bytes_by_source"].items() if v)
        lines.append(f"| {label} | {m['nodes']} | {'on' if m['peers'] else 'off'} | "
                     f"{m['slowest_s']:.2f} | {m['slowest_s'] / alone:.2f} | "
                     f"{m['origin_x_model']:.3f} / {m['origin_htb_x_model']:.3f} | "
                     f"{m['hedges']:g} | {src} |")
    lines += ["", "| target | value | |", "|---|---:|---|"]
    for r in rows:
        verdict = {True: "met", False: "**not met**", None: "not run"}[r["met"]]
        lines.append(f"| {r['target']} | {'-' if r['value'] is None else r['value']} | {verdict} |")
    lines += ["", "Raw runs (slowest s / origin x): " + "; ".join(
        f"{r['label']} {r['slowest_s']:.2f}/{r['origin_bytes'] / size:.2f}" for r in runs), ""]
    return "\n".join(lines)


def inner_main(work: Path, args: argparse.Namespace, argv: list[str]) -> int:
    from p2pfs.seaweed import SeaweedServer
    from peer_helpers import StoreRelay, mount_has_peer_flags

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    os.environ.update(CREDS)  # weed takes its S3 identity from the environment it starts in
    t_start = time.time()
    sw = SeaweedServer(work / "sw")
    relay = None
    failed = True
    try:
        sw.start()
        note_pids(work, sw.proc.pid)
        env = dict(os.environ, AWS_ENDPOINT_URL=sw.endpoint)
        size, sha = publish(sw, work, args.size_mib * MiB, env)
        log(f"published {size / MiB:.0f} MiB; store egress shaped to {args.store_gbit:g} Gbit/s")
        relay = StoreRelay(("127.0.0.1", sw.s3_port), host=STORE_ADDR).start()
        have_peers = mount_has_peer_flags()
        note = "" if have_peers or "on" not in args.modes else \
            "Peers on not run: `p2pfs mount` has no --peer-listen."
        runner = Runner(work, relay, size, sha, args)
        runs = []
        for rep in range(args.repeat):
            log(f"repeat {rep + 1}/{args.repeat}")
            for label, n, peers in configs(args, have_peers):
                runs.append(runner.run(label, n, peers))
        failed = False
    finally:
        if relay is not None:
            relay.stop()
        sw.stop()
        if failed:
            keep = Path(tempfile.mkdtemp(prefix="p2pfs-peers-bench-logs-"))
            for f in work.rglob("*.log"):
                shutil.copy(f, keep / f"{f.parent.name}-{f.name}")
            log(f"logs kept in {keep}")
    med = summarize(runs, size)
    rows, met = targets(med, args.nodes)
    md = markdown(args, argv, size, med, rows, runs, time.time() - t_start, note)
    (work / "result.json").write_text(json.dumps({
        "bytes": size, "store_gbit": args.store_gbit, "repeat": args.repeat, "runs": runs,
        "medians": med, "targets": rows, "targets_met": met, "markdown": md}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="2,4", help="comma-separated node counts (8 if it fits)")
    ap.add_argument("--size-mib", type=int, default=1024, help="model size (256 for quick runs)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store-gbit", type=float, default=1.0, help="the store's shaped egress")
    ap.add_argument("--modes", default="off,on", help="off, on or both (peers off / on)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the hashed re-read after each run")
    ap.add_argument("--json", type=Path, help="write every run, the medians and the targets here")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    if "--inner" in argv:  # the inner driver gets the user's arguments after its own
        i = argv.index("--inner")
        work, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    else:
        work = None
    args = ap.parse_args(argv)
    args.nodes = [int(n) for n in args.nodes.split(",") if n]
    args.modes = set(args.modes.split(","))
    if work is not None:
        return inner_main(work, args, argv)
    return outer_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
