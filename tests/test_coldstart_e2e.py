"""The whole cold-start chain with real parts only: SeaweedFS holding the published
all-MiniLM-L6-v2 and the converted minilm-serve image, a docker-registry, p2pfs FUSE
mounts (the weights, and the layers under the p2pfs snapshotter), containerd + runc, and
`p2pfs-scaler proxy --actuator containerd` in front (tests/coldstart_node.py).

From zero replicas, a bounded loopback burst (POST /embed from several clients) scales the
proxy to N replicas, each a container started from the lazily pulled image with the
weights read through the p2pfs mount by gpuload; every request is answered 200 with the
embedding this host computes with sentence-transformers; the status shows each cold start
stage by stage; after the grace the proxy scales back to zero, and at the end no container,
task, container snapshot, snapshot mount or FUSE mount of the node is left.

Needs root, /dev/fuse, containerd/ctr/runc and the minilm-serve image (bench/images.py
builds it once, with debootstrap, and caches it under /var/tmp/p2pfs-bench-images)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import needs_fuse
from containerd_helpers import HAVE_CONTAINERD
from coldstart_node import ColdStartNode, ColdStartStore, reference_embeddings

needs_containers = pytest.mark.skipif(
    not (HAVE_CONTAINERD and shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="needs root, containerd, ctr, runc, docker-registry and skopeo (Debian packages)")

REQUESTS, CLIENTS = 80, 12
TEXTS_PER_REQUEST = 4
MAX_REPLICAS = 3
#: Replica embeddings against this host's sentence-transformers: the same torch build, but
#: other thread counts may sum in another order (float32, unit vectors).
ATOL = 1e-5
SETTINGS = {"policy": {"max_replicas": MAX_REPLICAS, "target_concurrency": 2.0},
            # Queue bounds no request of the burst reaches: nothing may be refused.
            "proxy": {"max_concurrency": 4, "max_queue": 1000, "queue_timeout_s": 240.0}}

_WORDS = ("cold start lazy image layer weights chunk cache replica container scale zero "
          "burst queue proxy answer embedding model server node mount snapshot").split()


def corpus(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def minilm_image():
    from images import ImageBuildError, build_image, recipes  # bench/, on sys.path by coldstart_node
    if "minilm-serve" not in recipes():
        pytest.skip("bench/images.py has no minilm-serve recipe")
    try:
        return build_image("minilm-serve", log=lambda *a: None)
    except ImageBuildError as exc:
        pytest.skip(f"cannot build the minilm-serve image: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="module")
def store(minilm_image, seaweed, tmp_path_factory):
    s = ColdStartStore(tmp_path_factory.mktemp("coldstart"), minilm_image, seaweed=seaweed)
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def node(store, tmp_path):
    n = ColdStartNode("node", store, tmp_path, settings=SETTINGS)
    try:
        yield n
    finally:
        n.stop()


def test_node_settings_are_what_the_scaler_accepts(tmp_path):
    """The TOML a node writes for its proxy (defaults, the test's, the bench's standby) is
    read by the scaler's own loader into valid configs: a misspelt key fails here."""
    from scaler._config import _TABLES, build, load_toml

    from coldstart_node import DEFAULT_SETTINGS, merged, toml_text
    for extra in ({}, SETTINGS, {"policy": {"standby": 1, "min_standby": 1}}):
        tables = merged(DEFAULT_SETTINGS, extra)
        path = tmp_path / "scaler.toml"
        path.write_text(toml_text(tables))
        loaded = load_toml(path)
        assert loaded == tables
        for name, table in loaded.items():
            cfg = build(_TABLES[name], table)
            assert all(getattr(cfg, k) == v for k, v in table.items()), name


@needs_fuse
@needs_containers
def test_burst_from_zero_to_n_and_back_to_zero_answers_everything_and_leaves_nothing(node):
    run_chain(node)


def run_chain(node: ColdStartNode) -> dict:
    """The test's body (also runnable on a node built elsewhere); returns what it saw."""
    texts = corpus(REQUESTS * TEXTS_PER_REQUEST)
    expected = reference_embeddings(texts)
    node.start()
    paths = node.mount_paths()
    doc = node.status()
    assert not any(doc["replicas"].values()) and not node.containers(), doc  # min 0: nothing runs

    peak = {"serving": 0, "containers": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            try:
                peak["serving"] = max(peak["serving"], node.status()["replicas"]["serving"])
            except Exception:  # noqa: BLE001 - a status read racing the end of the test
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    jobs = iter(range(REQUESTS))
    lock = threading.Lock()
    answers: dict[int, tuple[int, object]] = {}

    def client() -> None:
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                return
            batch = texts[i * TEXTS_PER_REQUEST:(i + 1) * TEXTS_PER_REQUEST]
            answers[i] = node.embed(batch, timeout=300)

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            for f in [pool.submit(client) for _ in range(CLIENTS)]:
                f.result()
    finally:
        stop.set()
        watcher.join()
    burst_s = time.monotonic() - t0

    assert sorted(answers) == list(range(REQUESTS))
    bad = {i: a for i, a in answers.items() if a[0] != 200}
    assert not bad, f"{len(bad)} requests not answered 200: {list(bad.items())[:3]}"
    got = np.array([e for i in range(REQUESTS) for e in answers[i][1]["embeddings"]], dtype=np.float32)
    assert got.shape == (len(texts), 384) and all(answers[i][1]["dim"] == 384 for i in answers)
    diff = float(np.abs(got - expected).max())
    assert diff <= ATOL, f"embeddings differ from this host's by up to {diff}"

    # What a user runs: `p2pfs-scaler status --json` against the proxy.
    r = subprocess.run([sys.executable, "-m", "scaler.cli", "status", "--addr", f"127.0.0.1:{node.port}",
                        "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    q = doc["queue"]
    assert (q["served"], q["rejected_full"], q["rejected_timeout"], q["failed"]) == (REQUESTS, 0, 0, 0), q
    assert 2 <= peak["serving"] <= MAX_REPLICAS, f"did not scale up from zero to N: peak {peak}"
    cold = [s for s in doc["starts"] if s["kind"] == "cold" and s["state"] == "answered"]
    assert len(cold) >= 2, doc["starts"]
    for s in cold:
        st = s["stages"]
        assert all(st[k] is not None and st[k] >= 0 for k in
                   ("provision", "image", "weights", "server_init", "first_answer", "total")), s
        assert st["weights"] > 0 and st["total"] + 0.01 >= st["image"] + st["weights"], s
    assert cold[0]["stages"]["image"] > 0  # the pull and the create
    # The lazy path was the one taken: every layer served remotely by the p2pfs snapshotter,
    # the weights read through the p2pfs mount (from the object store) by gpuload.
    snap_log = node.snapshotter.log_text()
    assert snap_log.count("served remotely") == len(node.store.image.layers), snap_log[-2000:]
    assert node.models_mount.status()["bytes_by_source"]["origin"] > 0
    assert node.log_text().count("name=weights") >= len(cold) and "loader=gpuload" in node.log_text()

    # Back to zero after the grace: the actuator removed every container it started.
    node.wait_idle(timeout=120)
    assert not node.containers() and not node.tasks()

    def shims() -> list[str]:  # a shim exits a moment after its task is deleted
        out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
        return [ln for ln in out.splitlines() if "containerd-shim" in ln and " Z" not in ln
                and str(node.containerd.socket) in ln]
    deadline = time.monotonic() + 15
    while shims() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not shims(), shims()  # no task containerd finished for a ctr that was stopped
    assert not node.active_snapshots(), node.active_snapshots()
    # No container rootfs left; the two p2pfs mounts and the layers' EROFS mounts (the
    # snapshotter keeps one per layer for the next container) stay until the node stops.
    left = [m for m in node.mounts_below(paths) if m.split()[2] not in ("fuse.p2pfs", "erofs")]
    assert not left, left
    node.stop()
    left = node.mounts_below(paths)
    assert not left, left
    return {"burst_s": burst_s, "peak": peak, "starts": cold}
