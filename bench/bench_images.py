"""Image pull benchmark: time from pull start to a container's first output, and bytes
fetched by then and in total, for the two images of bench/images.py.

    .venv/bin/python bench/bench_images.py [--rounds 3] [--variants overlayfs,...] [--direct]
                                           [--images debian-python,torch-serve] [--rate BYTES/S]

Every round is a fresh node: a new containerd (its own root, so an empty content store and
no snapshots), and for the p2pfs variants a fresh p2pfs cache. The clock starts once the
node's services are up (containerd's socket; for p2pfs also the mount, the snapshotter's
socket and its object store, which it opens in the background). The pull goes through CRI's
ImageService (as kubelet pulls) and the container runs with `ctr run`; the clock starts when
PullImage is sent and stops at the container's first stdout byte. The registry sits behind
a counting TCP relay on loopback (tests/peer_helpers.StoreRelay): "registry bytes" are what
the registry sent (blobs, manifests, HTTP heads). A variant that also reads an object store
adds that store's counter to `Bench.meters`, so "bytes" is everything the node fetched.

With `--direct` there are no relays: bytes come from each node's content store (what
containerd fetched from the registry) plus the p2pfs daemon's origin bytes; the relays'
own CPU cost on a 2-core machine falls hardest on the variant moving the most bytes.

Variants are callables `(bench, image, ref, round) -> Sample` (VARIANTS below): overlayfs,
p2pfs-first (normal pull, layers converted in the background), p2pfs-lazy (a fresh node on
a converted prefix, no start-up lists) and p2pfs-prefetch (a fresh node after one untimed
lazy start recorded the lists). A p2pfs node runs the settings shipped for nodes
(deploy/kubernetes/configmap.yaml: `[cache] memory_prefault = true`, NODE_SETTINGS);
`P2PFS_BENCH_TOML` (TOML text) is merged over them, for probing settings
(`[fetch] pack_readahead = 0`). Results: a table on stdout and JSON in
bench/out/images-results.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

from containerd_helpers import Containerd  # noqa: E402
from image_helpers import RegistryServer  # noqa: E402
from images import BenchImage, build_image, push_bench_images  # noqa: E402
from peer_helpers import StoreRelay  # noqa: E402
from snapshotter._cri import ImageService  # noqa: E402

OUT = HERE / "out"


@dataclass
class Sample:
    """One round of one variant on one image."""

    seconds_to_first_output: float
    bytes_to_first_output: int      # everything fetched from the registry (+ meters) by then
    bytes_total: int                # ... by the time the container exited
    seconds_total: float            # pull start to container exit
    output: str
    extra: dict = field(default_factory=dict)


@dataclass
class Bench:
    """What every variant gets: a work dir, the registry and its counting relay, and
    `node_dir`, where a round's node state goes (containerd roots, p2pfs caches)."""

    workdir: Path
    node_dir: Path
    registry: RegistryServer
    relay: StoreRelay | None  # None (--direct): no relay; bytes come from the nodes' own counters
    meters: list[Callable[[], int]] = field(default_factory=list)  # more byte counters (an object store)
    resets: list[Callable[[], None]] = field(default_factory=list)

    @property
    def registry_mirror(self) -> dict[str, str]:
        """containerd's registries argument: refs name the registry, pulls go through the relay."""
        if self.relay is None:
            return {self.registry.host: self.registry.host}
        return {self.registry.host: f"{self.relay.address[0]}:{self.relay.address[1]}"}

    def reset(self) -> None:
        if self.relay is not None:
            self.relay.reset()
        for reset in self.resets:
            reset()

    def fetched(self) -> int:
        return (self.relay.egress if self.relay else 0) + sum(meter() for meter in self.meters)


Variant = Callable[[Bench, BenchImage, str, int], Sample]


def content_bytes(node: Containerd) -> int:
    """Bytes in a containerd's content store: with --direct, what it fetched from the
    registry (manifests, configs and, for a normal pull, every layer blob)."""
    blobs = node.root / "io.containerd.content.v1.content" / "blobs"
    return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0


def _pull_and_run(bench: Bench, node: Containerd, image: BenchImage, ref: str, container_id: str,
                  snapshotter: str, meter: Callable[[], int] | None = None) -> Sample:
    """The measured part every variant shares: CRI PullImage, then `ctr run` to first output.
    `meter`: this node's own byte counter, added to the bench's (--direct: the only one)."""
    at_first: list[int] = []
    if bench.relay is None:
        meter = meter or (lambda: content_bytes(node))
    bench.reset()
    fetched = (lambda: bench.fetched() + meter()) if meter else bench.fetched
    t0 = time.monotonic()
    with ImageService(str(node.socket), timeout=1800) as cri:
        cri.pull(ref)
    pulled = time.monotonic()
    run = node.run_container(ref, container_id, image.cmd, snapshotter=snapshotter, timeout=1800,
                             on_first_output=lambda: at_first.append(fetched()))
    total = fetched()
    first_line = run.output.splitlines()[0] if run.output else ""
    if run.first_output is None or not first_line.startswith(image.expect):
        raise RuntimeError(f"{image.name}: expected {image.expect!r} first, got {run.output!r}")
    return Sample(seconds_to_first_output=run.first_output - t0, bytes_to_first_output=at_first[0],
                  bytes_total=total, seconds_total=run.ended - t0, output=run.output,
                  extra={"pull_seconds": pulled - t0})


# --- variants --------------------------------------------------------------------------

def overlayfs(bench: Bench, image: BenchImage, ref: str, rnd: int) -> Sample:
    """Baseline: containerd's own download and unpack into overlayfs snapshots."""
    node = Containerd(bench.node_dir / f"overlayfs-{image.name}-{rnd}", snapshotter="overlayfs",
                      registries=bench.registry_mirror)
    node.start()
    try:
        return _pull_and_run(bench, node, image, ref, f"bench-ovl-{rnd}", "overlayfs")
    finally:
        node.stop()
        shutil.rmtree(node.root, ignore_errors=True)


# --- p2pfs nodes ----------------------------------------------------------------------

S3_ENV = {"AWS_ACCESS_KEY_ID": "p2pfs-bench", "AWS_SECRET_ACCESS_KEY": "p2pfs-bench",
          "AWS_REGION": "us-east-1"}
for _k, _v in S3_ENV.items():
    os.environ.setdefault(_k, _v)


class ObjectStore:
    """One SeaweedFS for the whole run, behind a counting relay: the bytes a node fetches
    from the object store are the relay's egress (everything p2pfs and the converter read)."""

    def __init__(self, workdir: Path, *, relay: bool) -> None:
        from p2pfs.seaweed import SeaweedServer

        self.server = SeaweedServer(workdir / "seaweed").start()
        self.server.create_bucket("layers")
        self.relay = StoreRelay(("127.0.0.1", self.server.s3_port)).start() if relay else None
        self.endpoint = self.relay.endpoint if self.relay else self.server.endpoint

    def close(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        self.server.stop()


_STORE: ObjectStore | None = None
_PREPARED: dict[tuple[str, str], str] = {}  # (variant family, image) -> layers URL ready for it


def _store(bench: Bench) -> ObjectStore:
    global _STORE
    if _STORE is None:
        _STORE = ObjectStore(bench.workdir, relay=bench.relay is not None)
        if _STORE.relay is not None:
            bench.meters.append(lambda: _STORE.relay.egress)
            bench.resets.append(_STORE.relay.reset)
    return _STORE


def close_store() -> None:
    global _STORE
    if _STORE is not None:
        _STORE.close()
        _STORE = None
    _PREPARED.clear()


#: What deploy/kubernetes/configmap.yaml sets for a node daemon that changes a start: the
#: memory tier faulted in at boot (a daemon is up long before a pull), not on the first reads.
NODE_SETTINGS = {"cache": {"memory_prefault": True}}


def node_toml(tables: dict, extra: str = "") -> str:
    """A p2pfs.toml: NODE_SETTINGS, then `tables`, then the TOML text `extra`, merged by
    table (scalar values only)."""
    import tomllib

    merged: dict[str, dict] = {}
    for layer in (NODE_SETTINGS, tables, tomllib.loads(extra)):
        for table, values in layer.items():
            merged.setdefault(table, {}).update(values)
    return "".join(f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   for table, values in merged.items())


class P2pfsNode:
    """A fresh node: a p2pfs mount of the layers prefix (new cache), the snapshotter over it
    (convert on first pull on) and a containerd with the snapshotter as its proxy plugin."""

    def __init__(self, bench: Bench, name: str, layers_url: str, *, startup_window: float,
                 erofs: bool = True) -> None:
        from conftest import Mount
        from image_node import Snapshotter

        store = _store(bench)
        self.dir = bench.node_dir / name
        self.dir.mkdir(parents=True)
        (self.dir / "p2pfs.toml").write_text(node_toml(
            {"mount": {"startup_window": startup_window}}, os.environ.get("P2PFS_BENCH_TOML", "")))
        mp = self.dir / "layers"
        mp.mkdir()
        self.cache = Path(tempfile.mkdtemp(prefix="p2pfs-bn-", dir="/var/tmp"))  # short: its control socket
        self.mount = Mount(layers_url, mp, self.cache, store.endpoint,
                           ["--allow-empty", "--config", str(self.dir / "p2pfs.toml")]).start()
        self.snapshotter = Snapshotter(self.dir / "snap", layers_mount=mp, layers_url=layers_url,
                                       endpoint=store.endpoint, plain_http=(bench.registry.host,), status=True,
                                       extra=(() if erofs else ("--no-erofs",)) + tuple(shlex.split(
                                           os.environ.get("P2PFS_BENCH_SNAPSHOTTER_ARGS", ""))))
        self.containerd = Containerd(self.dir / "containerd", snapshotter="p2pfs",
                                     proxy_socket=self.snapshotter.socket,
                                     registries=bench.registry_mirror)
        self.containerd.start()
        self.snapshotter.args += ["--containerd-root", str(self.containerd.root)]
        self.snapshotter.start()
        # A node serves pulls once its services are up: the snapshotter opens its object
        # store in the background after its socket, and that start-up (imports, the S3
        # client) must not be timed as the pull's (kubelet pulls on a Ready node).
        self.snapshotter.wait_store_open()
        self.containerd.wait_proxy_snapshotter("p2pfs")

    def layers_on_mount(self, image: BenchImage) -> int:
        return sum((self.mount.path / layer.digest.removeprefix("sha256:")).is_dir()
                   for layer in image.layers)

    def wait_converted(self, image: BenchImage, timeout: float = 900) -> float:
        """Seconds until every layer of `image` is converted and attached here."""
        from conftest import p2pfs_cmd

        t0 = time.monotonic()
        while self.layers_on_mount(image) < len(image.layers):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{image.name}: layers not converted in {timeout} s:\n"
                                   + self.snapshotter.log_text()[-3000:])
            time.sleep(0.5)
            p2pfs_cmd("refresh", str(self.mount.path), endpoint=self.mount.endpoint, check=False)
        return time.monotonic() - t0

    def fetched(self) -> int:
        """--direct: what this node fetched, from the registry (its content store) and from
        the object store (the p2pfs daemon's origin bytes)."""
        from p2pfs.control import request

        status = next(iter(request(self.mount.path, {"op": "status"}, timeout=10)))
        return content_bytes(self.containerd) + int(status.get("bytes_by_source", {}).get("origin", 0))

    def counts(self) -> dict:
        log = self.snapshotter.log_text()
        return {"layers_remote": log.count("served remotely"), "layers_local": log.count("pulled normally")}

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.snapshotter.stop()
            self.mount.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.cache, ignore_errors=True)


def _run_on_node(bench: Bench, image: BenchImage, ref: str, name: str, layers_url: str, *,
                 startup_window: float, after: Callable[[P2pfsNode, Sample], None] | None = None,
                 erofs: bool = True) -> Sample:
    node = P2pfsNode(bench, name, layers_url, startup_window=startup_window, erofs=erofs)
    try:
        sample = _pull_and_run(bench, node.containerd, image, ref, f"bench-{name}"[:60], "p2pfs",
                               meter=node.fetched if bench.relay is None else None)
        sample.extra.update(node.counts())
        if after is not None:
            after(node, sample)
        return sample
    finally:
        node.stop()


def _prefix(kind: str, image: BenchImage) -> str:
    import uuid

    return f"s3://layers/{kind}-{image.name}-{uuid.uuid4().hex[:6]}"


def p2pfs_first_pull(bench: Bench, image: BenchImage, ref: str, rnd: int) -> Sample:
    """The first node to pull an image nobody has converted: a normal pull into the
    snapshotter's own snapshots, then the layers converted in the background (timed to
    the end of the conversion in extra)."""
    def converted(node: P2pfsNode, sample: Sample) -> None:
        sample.extra["seconds_to_converted"] = round(sample.seconds_total + node.wait_converted(image), 2)

    return _run_on_node(bench, image, ref, f"first-{image.name}-{rnd}", _prefix("first", image),
                        startup_window=0, after=converted)


def _converted_prefix(bench: Bench, image: BenchImage, ref: str, kind: str) -> str:
    """A layers prefix on which `image` is converted (one untimed first pull), per kind."""
    key = (kind, image.name)
    if key not in _PREPARED:
        url = _prefix(kind, image)
        node = P2pfsNode(bench, f"prep-{kind}-{image.name}", url, startup_window=0)
        try:
            with ImageService(str(node.containerd.socket), timeout=1800) as cri:
                cri.pull(ref)
            node.wait_converted(image)
        finally:
            node.stop()
        _PREPARED[key] = url
    return _PREPARED[key]


def p2pfs_lazy(bench: Bench, image: BenchImage, ref: str, rnd: int, *, erofs: bool = True) -> Sample:
    """A fresh node (new containerd root, new p2pfs cache, same object store) pulling an
    image converted before, with no start-up list (recording off)."""
    url = _converted_prefix(bench, image, ref, "lazy")
    return _run_on_node(bench, image, ref, f"lazy-{image.name}-{rnd}", url, startup_window=0,
                        erofs=erofs)


def p2pfs_lazy_prefetch(bench: Bench, image: BenchImage, ref: str, rnd: int, *,
                        erofs: bool = True) -> Sample:
    """As p2pfs_lazy, on a prefix where one untimed lazy start has recorded the layers'
    start-up lists; the mount warms them in the background from the first open."""
    key = ("recorded", image.name)
    url = _converted_prefix(bench, image, ref, "prefetch")
    if key not in _PREPARED:
        window = 10.0

        def wait_recorded(node: P2pfsNode, sample: Sample) -> None:
            time.sleep(window + 3)  # every touched layer's window closes and its list is stored
            recorded = node.mount.status().get("startup", {}).get("lists_recorded", 0)
            if not recorded:
                raise RuntimeError(f"{image.name}: no start-up list recorded")

        _run_on_node(bench, image, ref, f"record-{image.name}", url, startup_window=window,
                     after=wait_recorded)
        _PREPARED[key] = url
    return _run_on_node(bench, image, ref, f"prefetch-{image.name}-{rnd}", url, startup_window=10.0,
                        erofs=erofs)


VARIANTS: dict[str, Variant] = {
    "overlayfs": overlayfs,
    "p2pfs-first": p2pfs_first_pull,
    "p2pfs-lazy": p2pfs_lazy,
    "p2pfs-prefetch": p2pfs_lazy_prefetch,
    # The same with the snapshotter's --no-erofs: overlayfs over the FUSE dirs (before 2026-12-03).
    "p2pfs-lazy-fuse": functools.partial(p2pfs_lazy, erofs=False),
    "p2pfs-prefetch-fuse": functools.partial(p2pfs_lazy_prefetch, erofs=False),
}
METRICS = ("seconds_to_first_output", "bytes_to_first_output", "bytes_total", "seconds_total")


# --- the harness -----------------------------------------------------------------------

def run(variants: dict[str, Variant], images: dict[str, BenchImage], rounds: int, *,
        rate: float = 0.0, node_parent: Path | None = None, direct: bool = False, log=print) -> dict:
    """Every variant on every image, ROUNDS times each (rounds interleaved across variants so
    drift on a shared machine hits all alike); returns the results as JSON-able data."""
    workdir = Path(tempfile.mkdtemp(prefix="p2pfs-bench-images-", dir="/var/tmp"))
    node_dir = Path(tempfile.mkdtemp(prefix="p2pfs-bench-nodes-", dir=node_parent or workdir))
    registry = RegistryServer(workdir / "registry").start()
    relay = None if direct else StoreRelay(("127.0.0.1", registry.port), rate=rate).start()
    results: dict[str, dict[str, list[Sample]]] = {v: {i: [] for i in images} for v in variants}
    try:
        t0 = time.monotonic()
        refs = push_bench_images(registry, images)
        log(f"pushed {', '.join(refs.values())} in {time.monotonic() - t0:.1f} s")
        bench = Bench(workdir=workdir, node_dir=node_dir, registry=registry, relay=relay)
        for rnd in range(rounds):
            for name, image in images.items():
                for vname, variant in variants.items():
                    os.sync()  # the last round's writeback (a GB of unpacked layers) must not stall this one
                    sample = variant(bench, image, refs[name], rnd)
                    results[vname][name].append(sample)
                    log(f"round {rnd} {vname:15} {name:14} first output {sample.seconds_to_first_output:7.2f} s"
                        f"  {sample.bytes_to_first_output / 1e6:8.1f} MB by then, "
                        f"{sample.bytes_total / 1e6:8.1f} MB total")
    finally:
        close_store()
        if relay is not None:
            relay.stop()
        registry.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "relay_rate": rate,
                    "direct": direct,
                    "node_fs": _fs_type(node_parent or Path("/var/tmp"))},
        "rounds": rounds,
        "images": {name: {"tag": img.tag, "layers": [asdict(layer) for layer in img.layers],
                          "blob_bytes": img.blob_bytes, "tar_bytes": img.tar_bytes,
                          "cmd": list(img.cmd)} for name, img in images.items()},
        "results": {v: {i: {"median": {m: statistics.median(getattr(s, m) for s in samples)
                                       for m in METRICS},
                            "rounds": [asdict(s) for s in samples]}
                        for i, samples in per_image.items()}
                    for v, per_image in results.items()},
    }


def _fs_type(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, *_ = line.split()
        if str(path.resolve()).startswith(target.rstrip("/") + "/") and len(target) > len(best[0]):
            best = (target, fstype)
    return best[1]


def table(data: dict) -> str:
    lines = [f"{'variant':16} {'image':14} {'image MB':>9} {'first out s':>12} {'MB by then':>11} "
             f"{'MB total':>9} {'exit s':>8}"]
    for vname, per_image in data["results"].items():
        for name, res in per_image.items():
            m = res["median"]
            lines.append(f"{vname:16} {name:14} {data['images'][name]['blob_bytes'] / 1e6:9.1f} "
                         f"{m['seconds_to_first_output']:12.2f} {m['bytes_to_first_output'] / 1e6:11.1f} "
                         f"{m['bytes_total'] / 1e6:9.1f} {m['seconds_total']:8.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="overlayfs",
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: overlayfs)")
    ap.add_argument("--images", default="debian-python,torch-serve")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="registry bandwidth in bytes/s through the relay (0 = loopback speed)")
    ap.add_argument("--node-dir", type=Path, default=None,
                    help="where each round's containerd root and caches go (default: under /var/tmp; "
                         "/dev/shm takes the disk's file-creation cost out of the unpack)")
    ap.add_argument("--direct", action="store_true",
                    help="no counting relays (they cost CPU, and most for the variant that moves "
                         "the most bytes): bytes from each node's content store and p2pfs counters")
    ap.add_argument("--out", type=Path, default=OUT / "images-results.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_images needs root (containerd, overlay mounts, debootstrap)")
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    images = {name: build_image(name) for name in args.images.split(",")}
    data = run(variants, images, args.rounds, rate=args.rate, node_parent=args.node_dir,
               direct=args.direct)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(table(data))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
