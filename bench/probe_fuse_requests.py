"""Probe: what one FUSE request costs, for the metadata requests a container start sends
(bench/RESULTS.md, "The FUSE request floor").

    sudo .venv/bin/python bench/probe_fuse_requests.py [--requests 3000] [--rounds 3]

A torch-serve start sends ~9,700 FUSE requests to the layers daemon (getxattr 3,249, lookup
2,141, open and release 1,067 each, read 1,412, ...), one at a time from the importing
process. This measures, side by side in one run, the round trip seen by a client process
and the daemon's CPU per request for:
- floor: a pyfuse3 filesystem on trio whose handlers do nothing (one file, no xattrs): what
  the library stack costs before any p2pfs code runs;
- p2pfs: a p2pfs mount (SeaweedFS on loopback) of a published file, the same requests.
Requests: getxattr of `trusted.overlay.metacopy` (ENODATA: what overlayfs asks of every
regular file in a lower layer), lookup of a missing name (a name that exists is cached by
the kernel), and open + close (open and release). Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_p2pfs import p2pfs, unmount_proc, wait_mounted  # noqa: E402
from p2pfs.seaweed import SeaweedServer  # noqa: E402

FLOOR_FS = textwrap.dedent('''
    import errno, stat, sys
    import pyfuse3, trio

    class FS(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_mode = (stat.S_IFDIR | 0o755) if inode == 1 else (stat.S_IFREG | 0o644)
            a.st_size = 4096
            a.attr_timeout = a.entry_timeout = 300
            return a
        async def lookup(self, parent, name, ctx=None):
            if name != b"f":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)
        async def getxattr(self, inode, name, ctx):
            raise pyfuse3.FUSEError(errno.ENODATA)
        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)
        async def release(self, fh):
            pass

    opts = set(pyfuse3.default_options)
    opts.add("fsname=floor")
    pyfuse3.init(FS(), sys.argv[1], opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
''')

#: The client: a separate process, as the container's importer is.
CLIENT = textwrap.dedent('''
    import json, os, sys, time
    f, n = sys.argv[1], int(sys.argv[2])
    # new names every run: p2pfs caches a missing name (negative entries), the floor does not
    missing = os.path.join(os.path.dirname(f), f"no-such-name-{os.getpid()}-%d")
    os.stat(f)
    def getxattr(i):
        try:
            os.getxattr(f, "trusted.overlay.metacopy")
        except OSError:
            pass
    def lookup_missing(i):
        try:
            os.stat(missing % i)
        except FileNotFoundError:
            pass
    def open_close(i):
        os.close(os.open(f, os.O_RDONLY))
    out = {}
    for name, fn in (("getxattr", getxattr), ("lookup (missing)", lookup_missing),
                     ("open + close", open_close)):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out[name] = (time.perf_counter() - t0) / n
    print(json.dumps(out))
''')


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def measure(path: Path, daemon_pid: int, n: int) -> dict[str, float]:
    """Round trip per request (µs) for each kind, and the daemon's CPU per request (µs)
    over all of them (open + close counts as 2 requests: open and release)."""
    c0 = cpu_s(daemon_pid)
    r = subprocess.run([sys.executable, "-c", CLIENT, str(path), str(n)], capture_output=True,
                       text=True, check=True)
    cpu = cpu_s(daemon_pid) - c0
    out = {k: v * 1e6 for k, v in json.loads(r.stdout).items()}
    out["daemon CPU per request"] = cpu / (4 * n) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="of each kind, per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p2pfs-probe-fuse-", dir="/var/tmp"))
    sw = SeaweedServer(work / "sw")
    floor_mnt, p2_mnt = work / "floor", work / "p2pfs"
    floor_mnt.mkdir()
    p2_mnt.mkdir()
    floor = None
    mounted = False
    results: dict[str, dict[str, list[float]]] = {"floor": {}, "p2pfs": {}}
    try:
        sw.start()
        sw.create_bucket("probe")
        src = work / "src" / "m"
        src.mkdir(parents=True)
        (src / "f").write_bytes(os.urandom(4096))
        p2pfs("publish", str(src), "s3://probe/m", endpoint=sw.endpoint)
        floor = subprocess.Popen([sys.executable, "-c", FLOOR_FS, str(floor_mnt)])
        wait_mounted(floor_mnt, floor)
        p2pfs("mount", "s3://probe", str(p2_mnt), "--cache-dir", str(work / "cache"),
              endpoint=sw.endpoint)
        mounted = True
        p2_pid = json.loads(p2pfs("status", "--json", str(p2_mnt), endpoint=sw.endpoint))["pid"]
        order = [("floor", floor_mnt / "f", floor.pid), ("p2pfs", p2_mnt / "m" / "f", p2_pid)]
        for r in range(args.rounds):
            for name, path, pid in order if r % 2 == 0 else order[::-1]:
                got = measure(path, pid, args.requests)
                print(f"round {r + 1} {name:6s} " + ", ".join(f"{k} {v:.0f} µs" for k, v in got.items()),
                      flush=True)
                for k, v in got.items():
                    results[name].setdefault(k, []).append(v)
        print("\nmedians (µs):")
        kinds = list(results["floor"])
        print(f"{'':26s}" + "".join(f"{k:>18s}" for k in ("floor", "p2pfs", "p2pfs / floor")))
        for k in kinds:
            f, p = statistics.median(results["floor"][k]), statistics.median(results["p2pfs"][k])
            print(f"{k:26s}{f:18.0f}{p:18.0f}{p / f:18.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if mounted:
            p2pfs("unmount", str(p2_mnt), endpoint=sw.endpoint)
        if floor is not None:
            unmount_proc(floor_mnt, floor)
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE mounts)")
    main()
