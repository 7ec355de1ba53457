"""The two benchmark images of bench_images.py, built here from Debian and the local torch
wheel, and cached under /var/tmp/p2pfs-bench-images (P2PFS_BENCH_IMAGES overrides).

- `debian-python`: Debian bookworm minbase (debootstrap) + python3 from apt: 2 layers,
  about 170 MB unpacked; runs `python3 -c 'print(1)'`.
- `torch-serve`: the same two layers + torch's Python dependencies (numpy, sympy, ...) + the
  torch 2.13.0 CPU wheel (pip's configured find-links, /opt/wheels here): 4 layers, over
  1 GB unpacked; runs `python3 -c 'import torch; print(torch.__version__)'`.

- `minilm-serve`: the reference replica (deploy/minilm-serve/README.md): the torch-serve
  layers + safetensors (the venv's version) + one layer with the repo's `gpuload/` (into
  site-packages) and `deploy/minilm-serve/*.py` (into /app); runs
  `python3 /app/serve.py --port 8000 --model /models/all-MiniLM-L6-v2` (the weights are
  bound in at run time, never in the image).

Each layer is the result of one step over the layers below it, cached by a hash of every
step up to it (so both images share their first two blobs, as real images do). A layer
above the base is built in an overlay mount whose upper dir becomes the layer: overlay
whiteouts (char 0:0, `trusted.overlay.opaque`) are written to the tar as OCI whiteouts.
Blobs are tar+gzip (level 6, like docker) in one OCI layout, CACHE/oci, tagged
`<name>-<hash12>`; `push_bench_images(registry)` copies them into a registry with skopeo. A
`copy` step (repo files into the image) carries the sha256 of every file it copies, so
editing one rebuilds only that layer.

Needs root (debootstrap, chroot, overlay mounts), debootstrap (`make test` installs it),
the apt mirror Debian's own sources name, and pip's index for the Python packages. The
image benchmark builds the first two, bench_coldstart.py the third; of the tests,
tests/test_replica_image.py and tests/test_coldstart_e2e.py build `minilm-serve` (from the
cache when its layers are there).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

CACHE = Path(os.environ.get("P2PFS_BENCH_IMAGES", "/var/tmp/p2pfs-bench-images"))
SUITE = "bookworm"
SITE = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path; the wheels are cp311
TORCH = "torch==2.13.0"
# torch's dependencies (pinned: a recipe change rebuilds), numpy because serving code uses it.
TORCH_DEPS = ("numpy==2.4.6", "filelock==4.3.1", "fsspec==2026.9.0", "jinja2==3.1.6",
              "markupsafe==3.0.4", "mpmath==1.3.0", "networkx==3.6.1", "sympy==1.14.0",
              "typing-extensions==4.16.0", "setuptools==84.2.1")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REPO = Path(__file__).resolve().parent.parent
MINILM_CMD = ["python3", "/app/serve.py", "--port", "8000", "--model", "/models/all-MiniLM-L6-v2"]
COPY_MTIME = 1_700_000_000  # copied files get one fixed mtime: same bytes, same layer blob

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
STEP_TIMEOUT = 1800  # seconds for one debootstrap/apt/pip step


class ImageBuildError(RuntimeError):
    """A build step failed (the message holds the command's output tail)."""


@dataclass(frozen=True)
class Layer:
    digest: str        # of the gzip blob (what the registry serves)
    diff_id: str       # of the uncompressed tar
    size: int          # blob bytes
    tar_size: int      # uncompressed tar bytes
    step: str          # what built it


@dataclass(frozen=True)
class BenchImage:
    name: str
    tag: str
    cmd: tuple[str, ...]
    expect: str         # how the first output line the container prints must start
    layers: tuple[Layer, ...]
    manifest_digest: str

    @property
    def blob_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_size for layer in self.layers)


def mirror() -> str:
    """The Debian mirror apt is configured with here (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def copy_step(trees: list[tuple[str, str]], *, pattern: str = "*.py") -> dict[str, Any]:
    """A step copying the files matching PATTERN of each (repo dir, image dir) pair (not
    recursive); it lists every file with its sha256, so the step's key follows their bytes."""
    files = []
    for src_dir, dest_dir in trees:
        found = sorted((REPO / src_dir).glob(pattern))
        if not found:
            raise ImageBuildError(f"nothing matches {src_dir}/{pattern} in {REPO}")
        for path in found:
            files.append([path.relative_to(REPO).as_posix(), f"{dest_dir}/{path.name}",
                          hashlib.sha256(path.read_bytes()).hexdigest()])
    return {"kind": "copy", "files": files}


def recipes() -> dict[str, dict[str, Any]]:
    base = [{"kind": "debootstrap", "suite": SUITE, "variant": "minbase", "mirror": mirror()},
            {"kind": "apt", "packages": ["python3"]}]
    torch_steps = base + [{"kind": "pip", "packages": list(TORCH_DEPS)},
                          {"kind": "pip", "packages": [TORCH]}]
    safetensors = f"safetensors=={importlib.metadata.version('safetensors')}"  # as on the host
    return {
        "debian-python": {"steps": base, "cmd": ["python3", "-c", "print(1)"], "expect": "1"},
        "torch-serve": {"steps": torch_steps,
                        "cmd": ["python3", "-c", "import torch; print(torch.__version__)"],
                        "expect": TORCH.split("==")[1]},
        # A server: it prints nothing on stdout (its log is stderr); it is checked over HTTP.
        "minilm-serve": {"steps": torch_steps + [
                             {"kind": "pip", "packages": [safetensors]},
                             copy_step([("gpuload", f"{SITE}/gpuload"), ("deploy/minilm-serve", "app")])],
                         "cmd": MINILM_CMD, "expect": ""},
    }


# --- building -------------------------------------------------------------------------

def build_all(log=print) -> dict[str, BenchImage]:
    """Build (or find cached) every bench image."""
    return {name: build_image(name, log=log) for name in recipes()}


def build_image(name: str, *, log=print) -> BenchImage:
    recipe = recipes()[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (a second waits, then finds the cache)
        _init_layout()
        layers: list[Layer] = []
        trees: list[Path] = []
        key = ""
        for step in recipe["steps"]:
            key = hashlib.sha256((key + json.dumps(step, sort_keys=True)).encode()).hexdigest()
            layer, tree = _layer(key, step, trees, log)
            layers.append(layer)
            trees.append(tree)
        tag = f"{name}-{key[:12]}"
        digest = _write_image(tag, layers, recipe["cmd"])
    return BenchImage(name=name, tag=tag, cmd=tuple(recipe["cmd"]), expect=recipe["expect"],
                      layers=tuple(layers), manifest_digest=digest)


def _layer(key: str, step: dict, lowers: list[Path], log) -> tuple[Layer, Path]:
    home = CACHE / "layers" / key
    meta, tree = home / "layer.json", home / "tree"
    if meta.exists():
        return Layer(**json.loads(meta.read_text())), tree
    desc = _describe(step)
    log(f"building layer {key[:12]}: {desc}")
    t0 = time.monotonic()
    if home.exists():
        _unmount_under(home)
        shutil.rmtree(home)
    home.mkdir(parents=True)
    tree.mkdir(mode=0o755)
    if step["kind"] == "debootstrap":
        _debootstrap(step, tree)
    elif step["kind"] == "apt":
        _in_overlay(home, tree, lowers, lambda root: _apt(root, step["packages"]))
    elif step["kind"] == "pip":
        _pip(tree, step["packages"])
    elif step["kind"] == "copy":
        _copy(tree, step["files"])
    else:
        raise ImageBuildError(f"unknown step {step}")
    layer = _write_layer(tree, desc)
    meta.write_text(json.dumps(layer.__dict__))
    log(f"  {layer.tar_size / 1e6:.1f} MB tar, {layer.size / 1e6:.1f} MB gzip, "
        f"{time.monotonic() - t0:.0f} s")
    return layer, tree


def _describe(step: dict) -> str:
    if step["kind"] == "debootstrap":
        return f"debootstrap --variant={step['variant']} {step['suite']} {step['mirror']}"
    if step["kind"] == "copy":
        dirs = sorted({f"/{dest.rpartition('/')[0]}" for _, dest, _ in step["files"]})
        return f"copy {len(step['files'])} files into {' '.join(dirs)}"
    return f"{step['kind']} install {' '.join(step['packages'])}"


def _run(argv: list[str], *, timeout: float = STEP_TIMEOUT, env: dict | None = None) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{' '.join(argv[:4])} ... took over {timeout} s "
                              f"(is the mirror/index reachable?)") from exc
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-25:])
        raise ImageBuildError(f"{' '.join(argv[:6])} ... failed ({r.returncode}):\n{tail}")


def _debootstrap(step: dict, tree: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is missing: apt-get install debootstrap (make test does)")
    _run(["debootstrap", f"--variant={step['variant']}", step["suite"], str(tree), step["mirror"]])
    _clean_apt(tree)


def _clean_apt(root: Path) -> None:
    """What `apt-get clean` and an image build's `rm -rf /var/lib/apt/lists/*` remove."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in root.glob(pattern):
            if p.is_file() and not p.name == "lock":
                p.unlink()
            elif p.is_dir() and p.name != "partial":
                shutil.rmtree(p)


def _apt(root: Path, packages: list[str]) -> None:
    env = {"PATH": PATH_ENV.split("=", 1)[1], "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
    _run(["chroot", str(root), "apt-get", "update", "-qq"], env=env)
    _run(["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
         env=env)
    _clean_apt(root)


def _pip(tree: Path, packages: list[str]) -> None:
    """pip (this interpreter's: the same Python minor and libc as the image) into the layer's
    site-packages; the directories above it get the modes the lower layer has (0755)."""
    target = tree
    for part in Path(SITE).parts:
        target = target / part
        target.mkdir(exist_ok=True)
        os.chmod(target, 0o755)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-warn-script-location",
          "--only-binary", ":all:", "--target", str(target), *packages])


def _copy(tree: Path, files: list[list[str]]) -> None:
    """Repo files into the layer (0644, directories 0755, one fixed mtime), each with its
    bytecode beside it (checked by source hash, so it stays valid whatever the mtime)."""
    for src, dest, digest in files:
        data = (REPO / src).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ImageBuildError(f"{src} changed while the image was being built")
        target = tree / dest
        _mkdirs(tree, target.parent)
        target.write_bytes(data)
        os.chmod(target, 0o644)
        if target.suffix == ".py":
            pyc = Path(py_compile.compile(str(target), dfile="/" + dest, doraise=True,
                                          invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH))
            os.chmod(pyc.parent, 0o755)
            os.chmod(pyc, 0o644)
    for path in sorted(tree.rglob("*"), reverse=True):
        os.utime(path, (COPY_MTIME, COPY_MTIME), follow_symlinks=False)


def _mkdirs(tree: Path, path: Path) -> None:
    """PATH and its parents below TREE, mode 0755 (the modes the lower layers have)."""
    if path == tree or path.is_dir():
        return
    _mkdirs(tree, path.parent)
    path.mkdir()
    os.chmod(path, 0o755)


def _in_overlay(home: Path, upper: Path, lowers: list[Path], work) -> None:
    """Run work(merged_root) in an overlay of LOWERS (bottom first) with UPPER as its upper dir,
    /proc mounted inside; afterwards UPPER holds exactly the layer's changes."""
    workdir, merged = home / "work", home / "merged"
    workdir.mkdir()
    merged.mkdir()
    opts = (f"lowerdir={':'.join(str(p) for p in reversed(lowers))},upperdir={upper},"
            f"workdir={workdir},redirect_dir=off,metacopy=off,index=off")
    _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], timeout=60)
    try:
        _run(["mount", "-t", "proc", "proc", str(merged / "proc")], timeout=60)
        try:
            work(merged)
        finally:
            _run(["umount", str(merged / "proc")], timeout=60)
    finally:
        _run(["umount", str(merged)], timeout=60)
    shutil.rmtree(workdir)
    merged.rmdir()


def _unmount_under(path: Path) -> None:
    prefix = str(path) + "/"
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)


# --- layer tars and the OCI layout ---------------------------------------------------

class _Hashing:
    """A write-only file that hashes and counts what passes through to `out`."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _write_layer(tree: Path, step: str) -> Layer:
    blobs = CACHE / "oci" / "blobs" / "sha256"
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    with os.fdopen(fd, "wb") as raw:
        blob = _Hashing(raw)
        with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=6, mtime=0) as gz:
            tar_out = _Hashing(gz)
            with tarfile.open(fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _tar_tree(tar, tree)
    os.replace(tmp, blobs / blob.sha.hexdigest())
    return Layer(digest="sha256:" + blob.sha.hexdigest(), diff_id="sha256:" + tar_out.sha.hexdigest(),
                 size=blob.size, tar_size=tar_out.size, step=step)


def _tar_tree(tar: tarfile.TarFile, root: Path) -> None:
    """ROOT as an OCI layer: sorted, parents first, numeric owners, xattrs as PAX
    SCHILY.xattr.*, hard links by inode, overlay whiteouts as `.wh.` entries."""
    for path, st in _entries(root):
        rel = path.relative_to(root).as_posix()
        if stat.S_ISSOCK(st.st_mode):
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # overlay whiteout
            parent, _, leaf = rel.rpartition("/")
            tar.addfile(_marker(f"{parent}/.wh.{leaf}" if parent else f".wh.{leaf}", st.st_mtime))
            continue
        info = tar.gettarinfo(str(path), arcname=rel)
        info.uname = info.gname = ""
        xattrs = {}
        opaque = False
        for name in os.listxattr(path, follow_symlinks=False):
            value = os.getxattr(path, name, follow_symlinks=False)
            if name == "trusted.overlay.opaque":
                opaque = value == b"y"
            elif not name.startswith("trusted.overlay."):
                xattrs["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = xattrs
        with open(path, "rb") if info.isreg() else contextlib.nullcontext() as content:
            tar.addfile(info, content)
        if opaque:
            tar.addfile(_marker(f"{rel}/.wh..wh..opq", st.st_mtime))


def _marker(name: str, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = int(mtime), 0o644
    return info


def _entries(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, lstat) of everything below ROOT: sorted by name, each directory before what it holds."""
    with os.scandir(root) as it:
        found = sorted(it, key=lambda e: e.name)
    for entry in found:
        st = entry.stat(follow_symlinks=False)
        yield Path(entry.path), st
        if stat.S_ISDIR(st.st_mode):
            yield from _entries(Path(entry.path))


def _init_layout() -> None:
    oci = CACHE / "oci"
    (oci / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (oci / "oci-layout").exists():
        (oci / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if not (oci / "index.json").exists():
        (oci / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))


def _put_blob(data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    path = CACHE / "oci" / "blobs" / "sha256" / hexd
    if not path.exists():
        path.write_bytes(data)
    return "sha256:" + hexd


def _write_image(tag: str, layers: list[Layer], cmd: list[str]) -> str:
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": layer.step} for layer in layers],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": _put_blob(config), "size": len(config)},
        "layers": [{"mediaType": MT_LAYER, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }, sort_keys=True).encode()
    digest = _put_blob(manifest)
    index_path = CACHE / "oci" / "index.json"
    index = json.loads(index_path.read_text())
    ref_key = "org.opencontainers.image.ref.name"
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(ref_key) != tag]
    index["manifests"].append({"mediaType": MT_MANIFEST, "digest": digest, "size": len(manifest),
                               "annotations": {ref_key: tag}})
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return digest


# --- pushing --------------------------------------------------------------------------

def push_bench_images(registry, images: dict[str, BenchImage] | None = None, *,
                      repo: str = "bench") -> dict[str, str]:
    """Copy bench images (all by default) into REGISTRY (anything with `.host`, e.g. tests/image_helpers'
    RegistryServer) over plain HTTP; returns {name: "host/repo/name:tag"}."""
    images = images or build_all()
    refs = {}
    for name, image in images.items():
        ref = f"{registry.host}/{repo}/{name}:{image.tag}"
        _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
              f"oci:{CACHE / 'oci'}:{image.tag}", f"docker://{ref}"], timeout=900)
        refs[name] = ref
    return refs


if __name__ == "__main__":
    for img in build_all().values():
        print(f"{img.name:14} {img.tag}  {len(img.layers)} layers  {img.tar_bytes / 1e6:7.1f} MB tar  "
              f"{img.blob_bytes / 1e6:7.1f} MB gzip")
