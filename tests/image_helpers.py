"""Container images for the image tests: a local registry, images built from directories,
and a small busybox image with every entry type the layer format must carry.

- `RegistryServer`: Debian's `docker-registry serve CONFIG` on 127.0.0.1 (a free port),
  filesystem storage under a temp dir, no auth. `start()` waits until `/v2/` answers;
  `stop()` kills it by PID. Small HTTP helpers (`put_blob`, `put_manifest`, `get`) push
  what skopeo cannot (an OCI index over several platforms, zstd or uncompressed layers).
- `registry`: a pytest fixture (one registry per test module). Test files use it with
  `from image_helpers import registry  # noqa: F401` (pytest finds fixtures imported into
  a test module).
- `build_image(oci_dir, tag, layers)`: an OCI image layout with one layer per directory.
  A layer directory is an OCI layer diff as it will appear in the tar: a file named
  `.wh.NAME` deletes NAME of a lower layer and a file `.wh..wh..opq` makes its directory
  opaque. The tar is written here (PAX, sorted, xattrs as `SCHILY.xattr.*`, hard links by
  inode) and added verbatim with `umoci raw add-layer`, which gzips it; `umoci repack`
  would instead compute a diff with go-mtree and can express deletions only as one
  `.wh.X` per deleted path (never an opaque directory), and `umoci insert --opaque` makes a
  layer per insert.
- `push(oci_dir, tag, registry, name)`: `skopeo copy` into the registry (plain HTTP).
- `busybox_image(tmp)`: busybox-static in three layers (see its docstring).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = MT_LAYER_TAR + "+gzip"
MT_LAYER_ZSTD = MT_LAYER_TAR + "+zstd"

FIXED_MTIME = 1_700_000_000  # layers are reproducible: same directories, same blobs

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RegistryServer:
    """A docker-registry (distribution 2.8) process on loopback; ours to stop by PID."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 30.0) -> "RegistryServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:  # keep the port on restart: references stay valid
            self.port = _free_port()
        config = self.data_dir / "config.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.data_dir / "storage")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }))
        log = open(self.data_dir / "registry.log", "ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}; "
                                   f"see {self.data_dir / 'registry.log'}")
            try:
                with _NO_PROXY.open(self.url + "/v2/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer /v2/ within {timeout}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the registry and nothing else
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> "RegistryServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- raw HTTP, for what skopeo cannot push ---------------------------------------

    def _request(self, method: str, path_or_url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        url = path_or_url if "://" in path_or_url else self.url + path_or_url
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with _NO_PROXY.open(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
        return self._request("GET", path, headers={"Accept": accept} if accept else None)

    def put_blob(self, name: str, data: bytes) -> str:
        """Upload a blob (monolithic: POST then PUT with the digest); returns its digest."""
        digest = "sha256:" + sha256_hex(data)
        code, headers, body = self._request("POST", f"/v2/{name}/blobs/uploads/")
        assert code == 202, (code, body)
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        code, _, body = self._request(
            "PUT", f"{location}{sep}digest={digest}", data=data,
            headers={"Content-Type": "application/octet-stream"})
        assert code == 201, (code, body)
        return digest

    def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        code, _, resp = self._request("PUT", f"/v2/{name}/manifests/{reference}", data=body,
                                      headers={"Content-Type": media_type})
        assert code == 201, (code, resp)
        return "sha256:" + sha256_hex(body)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- layers and images ----------------------------------------------------------------

def layer_tar(src: Path, dest: Path) -> Path:
    """Write directory `src` as an uncompressed PAX layer tar: entries sorted, parents first,
    owners and modes as on disk, mtimes fixed, xattrs as SCHILY.xattr.*, hard links by inode."""
    src = Path(src)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(src):
            rel = path.relative_to(src).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)  # tracks inodes: a 2nd name is a LNKTYPE
            info.mtime = FIXED_MTIME
            info.uname = info.gname = ""
            xattrs = {}
            if not path.is_symlink():
                for name in os.listxattr(path):
                    xattrs["SCHILY.xattr." + name] = os.getxattr(path, name).decode("utf-8", "surrogateescape")
            if xattrs:
                info.pax_headers = xattrs
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return dest


def _walk(root: Path) -> Iterator[Path]:
    for name in sorted(os.listdir(root)):
        p = root / name
        yield p
        if p.is_dir() and not p.is_symlink():
            yield from _walk(p)


def build_image(oci_dir: Path, tag: str, layers: list[Path], *, arch: str = "amd64",
                os_name: str = "linux", cmd: list[str] | None = None) -> Path:
    """Build OCI layout `oci_dir`:`tag` with one gzip layer per directory of `layers`."""
    oci_dir = Path(oci_dir)
    image = f"{oci_dir}:{tag}"
    if not (oci_dir / "index.json").exists():
        _run("umoci", "init", "--layout", str(oci_dir))
    _run("umoci", "new", "--image", image)
    for i, src in enumerate(layers):
        tar_path = oci_dir.parent / f".{oci_dir.name}-{tag}-layer{i}.tar"
        layer_tar(Path(src), tar_path)
        try:
            _run("umoci", "raw", "add-layer", "--image", image, "--no-history", str(tar_path))
        finally:
            tar_path.unlink()
    config = ["umoci", "config", "--image", image, "--no-history", "--architecture", arch,
              "--os", os_name]
    for arg in cmd or ["/bin/sh"]:
        config += ["--config.cmd", arg]
    _run(*config)
    return oci_dir


def push(oci_dir: Path, tag: str, registry: RegistryServer, name: str, *,
         manifest_format: str | None = None, dest_tag: str | None = None) -> str:
    """Copy `oci_dir`:`tag` to the registry as `name:tag` (or `name:dest_tag`), keeping the
    OCI manifest as is, or converting it with skopeo's `--format` (`v2s2`: a Docker v2
    manifest with Docker layer media types); returns the pushed manifest's digest."""
    digest_file = Path(oci_dir).parent / f".{Path(oci_dir).name}-{tag}.digest"
    fmt = ["--format", manifest_format] if manifest_format else ["--preserve-digests"]
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", *fmt,
         "--digestfile", str(digest_file), f"oci:{oci_dir}:{tag}",
         f"docker://{registry.host}/{name}:{dest_tag or tag}")
    digest = digest_file.read_text().strip()
    digest_file.unlink()
    return digest


def oci_manifest(oci_dir: Path, tag: str) -> dict:
    """The manifest of `tag` in an OCI layout (as umoci wrote it)."""
    index = json.loads((Path(oci_dir) / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(oci_blob(oci_dir, desc["digest"]))
    raise KeyError(tag)


def oci_blob(oci_dir: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (Path(oci_dir) / "blobs" / algo / hexd).read_bytes()


def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")


# --- the busybox test image -----------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "stat", "find", "sha256sum", "readlink", "test",
                   "sleep", "true", "env")


@dataclass(frozen=True)
class BuiltImage:
    oci_dir: Path
    tag: str
    layer_dirs: list[Path]
    expected_xattrs: bool  # False where the temp filesystem refuses user.* xattrs


def busybox_image(tmp: Path, tag: str = "v1") -> BuiltImage:
    """A three-layer image from /bin/busybox (busybox-static), built under `tmp`:

    1. base: bin/busybox, symlinks bin/<applet> -> busybox, etc/, tmp/ (1777), root/ (0700).
    2. files: etc/hello.txt, etc/app/{a.conf,b.conf}, etc/app/sub/, an empty dir srv/empty/,
       data/blob.bin (300 KiB, not very compressible) and its hard link data/blob-link,
       a symlink etc/motd -> hello.txt, a fifo data/fifo, a setuid root file bin/suid (4755),
       a setgid dir data/shared (2775, uid/gid 1000), a char device dev/null-ish (1:3), a block
       device dev/loop-ish (7:0) and a
       file with xattr user.p2pfs.test=layer2 (where the temp filesystem takes user xattrs).
    3. changes: deletes etc/hello.txt (`.wh.hello.txt`, so etc/motd dangles), makes etc/app
       opaque (`.wh..wh..opq`) with new content etc/app/c.conf, and rewrites data/note.txt.
    """
    tmp = Path(tmp)
    base, files, changes = (tmp / "layer-base", tmp / "layer-files", tmp / "layer-changes")
    for d in (base, files, changes):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    (base / "bin").mkdir()
    shutil.copy2("/bin/busybox", base / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (base / "bin" / applet).symlink_to("busybox")
    (base / "etc").mkdir()
    (base / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base / "tmp").mkdir()
    os.chmod(base / "tmp", 0o1777)
    (base / "root").mkdir(mode=0o700)
    os.chmod(base / "root", 0o700)

    (files / "etc" / "app" / "sub").mkdir(parents=True)
    (files / "etc" / "hello.txt").write_text("hello from layer 2\n")
    (files / "etc" / "motd").symlink_to("hello.txt")
    (files / "etc" / "app" / "a.conf").write_text("a=1\n")
    (files / "etc" / "app" / "b.conf").write_text("b=2\n")
    (files / "etc" / "app" / "sub" / "deep.txt").write_text("deep\n")
    (files / "srv" / "empty").mkdir(parents=True)
    data = files / "data"
    data.mkdir()
    blob = hashlib.sha256(b"seed").digest()
    chunks = []
    for i in range(300 * 1024 // 32):
        chunks.append(hashlib.sha256(blob + i.to_bytes(4, "little")).digest())
    (data / "blob.bin").write_bytes(b"".join(chunks))
    os.link(data / "blob.bin", data / "blob-link")
    (data / "note.txt").write_text("note v1\n")
    os.mkfifo(data / "fifo", 0o644)
    (data / "shared").mkdir()
    os.chown(data / "shared", 1000, 1000)
    os.chmod(data / "shared", 0o2775)
    (files / "bin").mkdir()
    (files / "bin" / "suid").write_text("#!/bin/sh\necho suid\n")
    os.chmod(files / "bin" / "suid", 0o4755)
    (files / "dev").mkdir()
    os.mknod(files / "dev" / "null-ish", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(files / "dev" / "null-ish", 0o666)  # mknod honours the umask
    os.mknod(files / "dev" / "loop-ish", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.chmod(files / "dev" / "loop-ish", 0o660)
    xattr_file = data / "xattr.txt"
    xattr_file.write_text("has an xattr\n")
    try:
        os.setxattr(xattr_file, "user.p2pfs.test", b"layer2")
        has_xattrs = True
    except OSError:
        has_xattrs = False

    (changes / "etc" / "app").mkdir(parents=True)
    (changes / "etc" / ".wh.hello.txt").write_bytes(b"")
    (changes / "etc" / "app" / ".wh..wh..opq").write_bytes(b"")
    (changes / "etc" / "app" / "c.conf").write_text("c=3\n")
    (changes / "data").mkdir()
    (changes / "data" / "note.txt").write_text("note v2\n")

    oci_dir = tmp / "oci"
    build_image(oci_dir, tag, [base, files, changes])
    return BuiltImage(oci_dir, tag, [base, files, changes], has_xattrs)


def compress_layer(tar_bytes: bytes, media_type: str) -> bytes:
    """A layer blob in `media_type`'s compression (for direct pushes with put_blob)."""
    if media_type.endswith("+gzip"):
        return gzip.compress(tar_bytes, mtime=0)
    if media_type.endswith("+zstd"):
        import zstandard
        return zstandard.ZstdCompressor().compress(tar_bytes)
    return tar_bytes
