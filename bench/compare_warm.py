"""bench_warm.py on this tree and on another checkout (an older commit, with bench_warm.py
copied in), interleaved one round at a time, N pairs; medians per method for both, as
Markdown rows (bench/RESULTS.md "Warm = local").

    sudo .venv/bin/python bench/compare_warm.py BASE_TREE [N=3] [--base-methods m1,m2,...]

BASE_TREE: e.g. `git worktree add /var/tmp/base <commit>`, then copy bench/bench_warm.py
there (drop its `local=` argument where that gpuload has no such option).
"""
import json, statistics, subprocess, sys
from pathlib import Path
HERE = Path(__file__).resolve().parent.parent
N = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 3
NEW = (str(HERE), "st-local,gl-local,gl-p2pfs,gl-p2pfs-fill,st-p2pfs,read-local,read-p2pfs")
BASE = (sys.argv[1], "st-local,gl-local,gl-p2pfs,st-p2pfs,read-local,read-p2pfs")
res = {"new": {}, "base": {}}
for i in range(N):
    for tag, (tree, methods) in (("new", NEW), ("base", BASE)):
        out = f"/tmp/compare-warm-{tag}-{i}.json"
        subprocess.run([sys.executable, "bench/bench_warm.py", "--size-gib", "2", "--rounds", "1",
                        "--settle", "2", "--methods", methods, "--json", out], cwd=tree, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
        d = json.load(open(out))
        for m, rs in d["results"].items():
            res[tag].setdefault(m, []).extend(rs)
        print(tag, i, {m: round(rs[0]["seconds"], 3) for m, rs in d["results"].items()}, flush=True)
json.dump(res, open("/tmp/compare-warm.json", "w"), indent=1)
gib = d["size"] / 2**30
for tag in ("base", "new"):
    anchor = statistics.median(r["seconds"] for r in res[tag]["st-local"])
    for m, rs in res[tag].items():
        med = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu"] + r["daemon_cpu"] for r in rs) / gib
        runs = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"| {tag} | {m} | {med:.3f} | {med / anchor:.2f} | {cpu:.2f} | {runs} |")
