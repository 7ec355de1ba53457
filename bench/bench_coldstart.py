"""Cold start benchmark: from one request arriving at zero replicas to its answer, with
the stages the scaler's status reports, for the MiniLM embedding replica (bench/images.py
`minilm-serve`) run as a container by `p2pfs-scaler proxy --actuator containerd`.

    .venv/bin/python bench/bench_coldstart.py [--rounds 3]
        [--variants baseline,p2pfs,p2pfs-warm,standby] [--json bench/coldstart-results.json]

Variants (tests/coldstart_node.py builds the nodes; every round's nodes are fresh unless
said otherwise, and rounds interleave the variants):
- baseline: a containerd with the overlayfs snapshotter (CRI's full pull and unpack), the
  weights copied by `aws s3 cp` on the host (the actuator's --setup-cmd) into a dir bound
  into the container, loaded with safetensors (`--loader safetensors`);
- p2pfs: the image lazily through the p2pfs snapshotter, the weights through a p2pfs
  mount, loaded with gpuload; fresh p2pfs caches and containerd root; the daemons run the
  settings shipped for nodes (bench_images.NODE_SETTINGS);
- p2pfs-warm: the same node again after it scaled to zero: p2pfs caches, containerd's
  image and the proxy's pull kept (the container is created anew);
- standby: a p2pfs node with `[policy] standby = 1, min_standby = 1`: a standby replica is
  started at zero and waits ready; the request promotes it. Its figure is the scale
  decision -> answer (the `promote` + `first_answer` stages), as the target is stated;
- p2pfs-ab: the p2pfs variant with the TOML in $P2PFS_BENCH_AB_TOML merged over its
  daemons' settings, for an A/B of one setting in the same rounds (not in the defaults).

The clock is the client's: the request is sent to the proxy at zero replicas, and stops at
its answer (checked against this host's sentence-transformers embedding). The stages come
from `GET /-/status` (provision, image, weights, server_init, first_answer; total = the
scale decision -> the answer). Before each timed request the page cache is dropped (the
registry and the object store are remote in a real fleet; their files are on this disk
here), unless --keep-page-cache. Before the rounds one untimed p2pfs start runs (--no-prime
skips it): it records the image layers' start-up lists, which every later node of a fleet
finds, so the timed rounds see the steady state rather than the very first start ever.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

S3_ENV = {"AWS_ACCESS_KEY_ID": "p2pfs-bench", "AWS_SECRET_ACCESS_KEY": "p2pfs-bench",
          "AWS_REGION": "us-east-1"}
for _k, _v in S3_ENV.items():
    os.environ.setdefault(_k, _v)

from coldstart_node import ColdStartNode, ColdStartStore, merged, reference_embeddings  # noqa: E402

STAGES = ("provision", "image", "weights", "server_init", "promote", "first_answer", "total")
TEXT = "A replica scaled from zero answers this sentence."
OUT = HERE / "coldstart-results.json"
STANDBY = {"policy": {"standby": 1, "min_standby": 1}}


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


class Bench:
    def __init__(self, store: ColdStartStore, workdir: Path, *, drop_cache: bool,
                 node_kw: dict[str, Any] | None = None) -> None:
        self.store, self.workdir, self.drop_cache = store, workdir, drop_cache
        self.node_kw = node_kw or {}
        self.expected = reference_embeddings([TEXT])[0]

    def node(self, name: str, **kw: Any) -> ColdStartNode:
        from bench_images import node_toml  # the settings shipped for node daemons

        return ColdStartNode(name, self.store, self.workdir,
                             **{"p2pfs_toml": node_toml({}, os.environ.get("P2PFS_BENCH_TOML", "")),
                                **self.node_kw, **kw}).start()

    def timed(self, node: ColdStartNode, kind: str) -> dict:
        """One request at zero serving replicas, timed by the client; its start's stages."""
        import numpy as np

        doc = node.status()
        assert doc["replicas"]["serving"] == 0 and doc["replicas"]["starting"] == 0, doc["replicas"]
        seen = {(s["replica"], s["kind"]) for s in doc["starts"]}
        fetched = node_bytes(node)
        if self.drop_cache:
            drop_page_cache()
        t0 = time.monotonic()
        status, body = node.embed([TEXT], timeout=900)
        seconds = time.monotonic() - t0
        if status != 200:
            raise RuntimeError(f"{node.name}: answered {status}: {body!r}\n{node.log_text()[-3000:]}")
        diff = float(np.abs(np.asarray(body["embeddings"][0], dtype=np.float32) - self.expected).max())
        if diff > 1e-5:
            raise RuntimeError(f"{node.name}: embedding differs from this host's by {diff}")
        doc = node.status()
        new = [s for s in doc["starts"] if (s["replica"], s["kind"]) not in seen
               and s["kind"] == kind and s["state"] == "answered"]
        if len(new) != 1:
            raise RuntimeError(f"{node.name}: expected one answered {kind} start, got {doc['starts']}")
        return {"seconds": round(seconds, 3), "stages": new[0]["stages"], "replica": new[0]["replica"],
                "bytes_fetched": node_bytes(node) - fetched}


def node_bytes(node: ColdStartNode) -> int:
    """What the node fetched so far: the registry's blobs in its content store, plus the
    p2pfs mounts' origin bytes (p2pfs) or the weights copied (baseline). A sample's
    `bytes_fetched` is its growth from before the request to the answer."""
    from bench_images import content_bytes

    total = content_bytes(node.containerd)
    if node.mode == "p2pfs":
        for m in (node.models_mount, node.layers_mount):
            total += int(m.status().get("bytes_by_source", {}).get("origin", 0))
    else:
        total += sum(p.stat().st_size for p in (node.dir / "weights").rglob("*") if p.is_file())
    return total


# --- variants: each returns {variant: sample} for one round -------------------------------

def baseline(bench: Bench, rnd: int, wanted: set[str]) -> dict[str, dict]:
    node = bench.node(f"baseline-{rnd}", mode="overlayfs")
    try:
        return {"baseline": bench.timed(node, "cold")}
    finally:
        node.stop()
        node.remove_dir()


def p2pfs(bench: Bench, rnd: int, wanted: set[str]) -> dict[str, dict]:
    """A fresh p2pfs node; with p2pfs-warm, the same node again once it is back at zero."""
    node = bench.node(f"p2pfs-{rnd}")
    try:
        out = {"p2pfs": bench.timed(node, "cold")}
        if "p2pfs-warm" in wanted:
            node.wait_idle(timeout=180)
            out["p2pfs-warm"] = bench.timed(node, "cold")
        if "p2pfs" not in wanted:
            del out["p2pfs"]
        return out
    finally:
        node.stop()
        node.remove_dir()


def p2pfs_ab(bench: Bench, rnd: int, wanted: set[str]) -> dict[str, dict]:
    """The p2pfs variant with P2PFS_BENCH_AB_TOML merged over its daemons' settings (an A/B
    of one setting, interleaved with the other variants in the same rounds)."""
    before = os.environ.get("P2PFS_BENCH_TOML", "")
    os.environ["P2PFS_BENCH_TOML"] = before + "\n" + os.environ.get("P2PFS_BENCH_AB_TOML", "")
    try:
        node = bench.node(f"p2pfs-ab-{rnd}")
    finally:
        os.environ["P2PFS_BENCH_TOML"] = before
    try:
        return {"p2pfs-ab": bench.timed(node, "cold")}
    finally:
        node.stop()
        node.remove_dir()


def standby(bench: Bench, rnd: int, wanted: set[str]) -> dict[str, dict]:
    node = bench.node(f"standby-{rnd}", settings=merged(bench.node_kw.get("settings", {}), STANDBY))
    try:
        doc = node.wait(lambda d: d["replicas"]["standby"] >= 1, 300, "a ready standby replica")
        warmed = [s for s in doc["starts"] if s["role"] == "standby"][-1]
        sample = bench.timed(node, "promotion")
        sample["seconds_to_standby"] = warmed["stages"]["total"]
        return {"standby": sample}
    finally:
        node.stop()
        node.remove_dir()


def prime_lists(bench: Bench, timeout: float = 120.0) -> int:
    """One untimed p2pfs start, kept until every layer it read has its start-up list
    stored (each once its reads pause, within the mount's window); how many were."""
    node = bench.node("prime")
    try:
        bench.timed(node, "cold")
        log = node.caches / "layers" / "p2pfs.log"  # the layers mount's daemon log
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")
            touched, stored = text.count("recording its start-up reads"), text.count("stored its start-up list")
            if (touched and stored >= touched) or time.monotonic() > deadline:
                return stored
            time.sleep(0.5)
    finally:
        node.stop()
        node.remove_dir()


GROUPS: dict[str, tuple[tuple[str, ...], Callable[[Bench, int, set[str]], dict[str, dict]]]] = {
    "baseline": (("baseline",), baseline),
    "p2pfs": (("p2pfs", "p2pfs-warm"), p2pfs),
    "standby": (("standby",), standby),
    "p2pfs-ab": (("p2pfs-ab",), p2pfs_ab),
}
VARIANTS = [v for names, _ in GROUPS.values() for v in names]
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "p2pfs-ab"]


# --- the harness ------------------------------------------------------------------------

def run(variants: list[str], rounds: int, *, image_name: str = "minilm-serve", prime: bool = True,
        drop_cache: bool = True, node_kw: dict[str, Any] | None = None, log=print) -> dict:
    from images import build_image

    image = build_image(image_name, log=log)
    workdir = Path(tempfile.mkdtemp(prefix="p2pfs-bench-coldstart-", dir="/var/tmp"))
    store = ColdStartStore(workdir, image)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    wanted = set(variants)
    try:
        store.start()
        log("store ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in store.timings.items()))
        bench = Bench(store, workdir, drop_cache=drop_cache, node_kw=node_kw)
        if prime:
            t = time.monotonic()
            n = prime_lists(bench)
            log(f"primed: one untimed p2pfs start recorded {n} start-up lists in {time.monotonic() - t:.1f} s")
        for rnd in range(rounds):
            for names, group in GROUPS.values():
                if not wanted & set(names):
                    continue
                for name, sample in group(bench, rnd, wanted).items():
                    results[name].append(sample)
                    st = sample["stages"]
                    log(f"round {rnd} {name:11} {sample['seconds']:7.2f} s  "
                        + "  ".join(f"{k} {st[k]:.2f}" for k in STAGES if st.get(k) is not None))
    finally:
        store.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return summarize(results, rounds=rounds, image=image, store=store, prime=prime,
                     drop_cache=drop_cache)


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def summarize(results: dict[str, list[dict]], *, rounds: int, image, store: ColdStartStore,
              prime: bool, drop_cache: bool) -> dict:
    med = {v: {"seconds": _median([s["seconds"] for s in samples]),
               "bytes_fetched": _median([s["bytes_fetched"] for s in samples]),
               "stages": {k: _median([s["stages"].get(k) for s in samples]) for k in STAGES}}
           for v, samples in results.items() if samples}
    base = med.get("baseline", {}).get("seconds")
    ratios = {v: round(m["seconds"] / base, 3) for v, m in med.items() if base and m["seconds"]}
    targets: dict[str, Any] = {}
    if "p2pfs" in ratios:
        targets["p2pfs_at_most_0.3x_baseline"] = {"ratio": ratios["p2pfs"], "met": ratios["p2pfs"] <= 0.3}
    if "standby" in med:
        s = med["standby"]["stages"]["total"]
        targets["standby_within_1s_of_decision"] = {"seconds": s, "met": s is not None and s <= 1.0}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "commit": commit},
        "command": " ".join([".venv/bin/python", "bench/bench_coldstart.py", *sys.argv[1:]]),
        "rounds": rounds, "primed": prime, "page_cache_dropped": drop_cache,
        "image": {"name": image.name, "tag": image.tag, "layers": len(image.layers),
                  "blob_bytes": image.blob_bytes, "tar_bytes": image.tar_bytes},
        "setup_s": {k: round(v, 2) for k, v in store.timings.items()},
        "median": med, "vs_baseline": ratios, "targets": targets, "rounds_detail": results,
    }


def table(data: dict) -> str:
    cols = ["seconds", *STAGES, "MB"]
    lines = [f"{'variant':11}" + "".join(f"{c:>13}" for c in cols) + f"{'vs base':>9}"]
    for v, m in data["median"].items():
        cells = [m["seconds"], *(m["stages"].get(k) for k in STAGES), (m["bytes_fetched"] or 0) / 1e6]
        lines.append(f"{v:11}" + "".join(f"{'-' if c is None else format(c, '.2f'):>13}" for c in cells)
                     + f"{data['vs_baseline'].get(v, float('nan')):9.2f}")
    for name, t in data["targets"].items():
        lines.append(f"target {name}: {'met' if t['met'] else 'MISSED'} ({t})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=OUT, help=f"results file (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--image", default="minilm-serve", help="bench/images.py recipe")
    ap.add_argument("--no-prime", action="store_true", help="no untimed p2pfs start before the rounds")
    ap.add_argument("--keep-page-cache", action="store_true", help="do not drop it before each request")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_coldstart needs root (containerd, FUSE, overlay mounts)")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; of {VARIANTS}")
    data = run(variants, args.rounds, image_name=args.image, prime=not args.no_prime,
               drop_cache=not args.keep_page_cache)
    args.json.write_text(json.dumps(data, indent=1))
    print(table(data))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
