"""One benchmark on this tree and on another checkout, interleaved one run at a time.

    sudo .venv/bin/python bench/compare_trees.py BASE_TREE PAIRS OUTDIR -- SCRIPT ARGS...

Runs `python SCRIPT ARGS` PAIRS times in each tree, alternating (new, base, new, ...), with
the tree as working directory and first on PYTHONPATH (so its p2pfs, snapshotter, gpuload
and scaler are imported, also by the daemons the benchmark starts with `python -m`). Each
run's `{json}` in ARGS becomes OUTDIR/<new|base>-<i>.json. Summaries are the benchmark's
own (its JSON); this driver only interleaves, so both trees see the same machine state.
BASE_TREE: e.g. `git worktree add /var/tmp/base <commit>` with a `.venv` link to this one.
"""
import os, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
base, pairs, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cmd = sys.argv[sys.argv.index("--") + 1:]
out.mkdir(parents=True, exist_ok=True)
for i in range(pairs):
    for tag, tree in (("new", str(HERE)), ("base", base)):
        j = out / f"{tag}-{i}.json"
        args = [a.replace("{json}", str(j)) for a in cmd]
        env = {**os.environ, "PYTHONPATH": tree}
        t0 = time.time()
        with open(out / f"{tag}-{i}.log", "w") as logf:
            r = subprocess.run([sys.executable, *args], cwd=tree, env=env, timeout=3600,
                               stdout=logf, stderr=subprocess.STDOUT)
        print(f"{tag} {i}: rc {r.returncode} in {time.time() - t0:.0f} s", flush=True)
