"""Integration: layer conversion against a real SeaweedFS, and the converted layers seen
through a real FUSE mount of the layers prefix (and an overlayfs over it)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import trio
import trio_asyncio
import zstandard

from conftest import needs_fuse, p2pfs_cmd
from p2pfs.config import S3Config
from p2pfs.errors import LayerError
from p2pfs.image import convert_layer, layer_exists
from p2pfs.manifest import parse
from p2pfs.origin import parse_url
from p2pfs.origin._s3 import S3Origin

KiB = 1024
RNG = random.Random(9)
BUSYBOX = RNG.randbytes(300 * KiB)  # incompressible: the bytes stored are the bytes shared
BIG = RNG.randbytes(1536 * KiB + 11)  # several 256 KiB chunks
DUP = RNG.randbytes(600 * KiB)
MTIME = 1_700_000_000


def member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
           **fields) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mtime = kind, MTIME
    ti.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    for k, v in fields.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tar_of(build) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def base_layer(tar: tarfile.TarFile) -> None:
    member(tar, "./", tarfile.DIRTYPE)
    member(tar, "bin/", tarfile.DIRTYPE)
    member(tar, "bin/busybox", data=BUSYBOX, mode=0o755)
    member(tar, "bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777)
    member(tar, "bin/ls", tarfile.LNKTYPE, linkname="bin/busybox")
    member(tar, "usr/bin/passwd", data=b"#!/bin/sh\n", mode=0o4755)
    member(tar, "usr/bin/wall", data=b"w", mode=0o2711, gid=5)
    member(tar, "tmp/", tarfile.DIRTYPE, mode=0o1777)
    member(tar, "home/user/", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000)
    member(tar, "home/user/.profile", data=b"export PS1='$ '\n", uid=1000, gid=1000)
    member(tar, "etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42)
    member(tar, "etc/hosts", data=b"127.0.0.1 localhost\n")
    member(tar, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    member(tar, "dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6)
    member(tar, "run/initctl", tarfile.FIFOTYPE, mode=0o600)
    member(tar, "var/lib/old/data", data=b"old")
    member(tar, "empty/", tarfile.DIRTYPE, mode=0o750)
    member(tar, "big.bin", data=BIG)
    member(tar, "dup1", data=DUP)
    member(tar, "dup2", data=DUP)
    member(tar, "caps", data=b"c", pax_headers={"SCHILY.xattr.user.note": "hello",
                                                "SCHILY.xattr.trusted.p2pfs": "t"})


def upper_layer(tar: tarfile.TarFile) -> None:
    member(tar, "etc/.wh.shadow")
    member(tar, "var/lib/.wh..wh..opq")
    member(tar, "var/lib/new", data=b"new")
    member(tar, "bin/busybox", data=BUSYBOX, mode=0o755)  # shared with the base layer
    member(tar, "added", data=b"only here")


BASE = tar_of(base_layer)
UPPER = tar_of(upper_layer)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def with_origin(endpoint: str, fn):
    async def main():
        async with trio_asyncio.open_loop():
            origin = await S3Origin.create("models", S3Config(endpoint_url=endpoint))
            try:
                return await fn(origin)
            finally:
                await origin.aclose()
    try:
        return trio.run(main)
    except BaseExceptionGroup as group:  # trio-asyncio's loop nursery wraps what fn raised
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


def convert(endpoint: str, root_url: str, blob: bytes, **kw):
    root = parse_url(root_url)
    return with_origin(endpoint, lambda o: convert_layer(o, root, lambda: io.BytesIO(blob), **kw))


def objects(endpoint: str, root_url: str) -> dict[str, int]:
    root = parse_url(root_url)

    async def ls(o):
        return {i.key[len(root.prefix):]: i.size for i in await o.list(root.prefix)}
    return with_origin(endpoint, ls)


def new_root() -> str:
    return f"s3://models/layers-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def layers(seaweed):
    """The base layer as gzip, the upper as zstd, under one fresh root."""
    root = new_root()
    base_blob, upper_blob = gzip.compress(BASE), zstandard.ZstdCompressor().compress(UPPER)
    base = convert(seaweed.endpoint, root, base_blob)
    before = objects(seaweed.endpoint, root)
    upper = convert(seaweed.endpoint, root, upper_blob)
    after = objects(seaweed.endpoint, root)
    return {"root": root, "base": base, "upper": upper, "before": before, "after": after,
            "base_blob": base_blob, "upper_blob": upper_blob}


def test_layers_are_published_under_their_blob_digest(seaweed, layers):
    base, upper = layers["base"], layers["upper"]
    assert base.digest == sha(layers["base_blob"]) and base.diff_id == sha(BASE)
    assert upper.digest == sha(layers["upper_blob"]) and upper.diff_id == sha(UPPER)
    assert base.blob_bytes == len(layers["base_blob"]) and base.bytes_in == len(BASE)
    root = parse_url(layers["root"])

    async def check(o):
        for res, media in ((base, "application/vnd.oci.image.layer.v1.tar+gzip"),
                           (upper, "application/vnd.oci.image.layer.v1.tar+zstd")):
            assert await layer_exists(o, root, res.hex)
            m = parse(await o.get(f"{root.prefix}{res.hex}/.p2pfs/manifest.json"))
            assert m.kind == "layer" and m.blob_root == ".." and m.digest == res.manifest_digest
            assert m.annotations == {"org.p2pfs.layer.digest": res.digest,
                                     "org.p2pfs.layer.diff-id": res.diff_id,
                                     "org.p2pfs.layer.media-type": media,
                                     "org.p2pfs.layer.compressed-size": str(res.blob_bytes)}
            for key in m.blobs:  # every pack it names exists, with its index
                await o.head(root.prefix + key)
                await o.head(f"{root.prefix}.p2pfs/packs/{key.removeprefix('blobs/')}.json")
        assert not await layer_exists(o, root, "0" * 64)
    with_origin(seaweed.endpoint, check)


def test_same_content_is_stored_once(seaweed, layers):
    base, upper = layers["base"], layers["upper"]
    assert base.dedup_bytes == len(DUP)  # dup2 is dup1's chunks
    packs = {k: n for k, n in layers["before"].items() if k.startswith("blobs/")}
    assert sum(packs.values()) == base.stored_bytes
    assert base.stored_bytes < len(BUSYBOX) + len(BIG) + len(DUP) + 4 * KiB + 4 * KiB
    # The upper layer shares bin/busybox: only its small new files are stored.
    new = {k: n for k, n in layers["after"].items() if k.startswith("blobs/") and k not in packs}
    assert upper.dedup_bytes == len(BUSYBOX)
    assert sum(new.values()) == upper.stored_bytes < 1 * KiB


@pytest.mark.parametrize("codec", ["plain", "gzip", "zstd"])
def test_every_codec_gives_the_same_tree(seaweed, codec):
    root = new_root()
    blob = {"plain": BASE, "gzip": gzip.compress(BASE, 1),
            "zstd": zstandard.ZstdCompressor(level=1).compress(BASE)}[codec]
    media = {"plain": "application/vnd.oci.image.layer.v1.tar",
             "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}[codec]
    by_magic = convert(seaweed.endpoint, root, blob)
    assert by_magic.digest == sha(blob) and by_magic.diff_id == sha(BASE)
    by_type = convert(seaweed.endpoint, new_root(), blob, media_type=media)
    # Only the media-type annotation differs (the docker and +gzip names for gzip).
    assert (by_type.manifest_digest == by_magic.manifest_digest) == (codec != "gzip")
    assert (by_type.entries, by_type.files, by_type.diff_id) == \
        (by_magic.entries, by_magic.files, by_magic.diff_id)
    with pytest.raises(LayerError, match="media type"):
        convert(seaweed.endpoint, root, blob, media_type="application/vnd.oci.image.layer.v1.tar+lz4")


def test_wrong_digest_publishes_no_manifest(seaweed):
    root = new_root()
    blob = gzip.compress(BASE)
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(LayerError, match="expected"):
        convert(seaweed.endpoint, root, blob, expected_digest=wrong)
    keys = objects(seaweed.endpoint, root)
    assert not any(k.endswith("manifest.json") for k in keys), keys
    with pytest.raises(LayerError, match="sha256:<64"):
        convert(seaweed.endpoint, root, blob, expected_digest="md5:abc")


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress])
def test_truncated_blob_publishes_nothing(seaweed, compress):
    root = new_root()
    blob = compress(BASE)[:-1000]  # zstd's reader says nothing; the tar's missing end does
    with pytest.raises(LayerError, match="truncated"):
        convert(seaweed.endpoint, root, blob)
    assert not any(k.endswith("manifest.json") for k in objects(seaweed.endpoint, root))


def test_reconvert_is_idempotent_and_quick(seaweed):
    root = new_root()
    blob = zstandard.ZstdCompressor().compress(BASE)
    first = convert(seaweed.endpoint, root, blob, expected_digest=sha(blob))
    keys = objects(seaweed.endpoint, root)
    opened = []

    def open_blob():
        opened.append(1)
        return io.BytesIO(blob)

    again = with_origin(seaweed.endpoint, lambda o: convert_layer(
        o, parse_url(root), open_blob, expected_digest=sha(blob)))
    assert again.existed and not opened  # answered from the manifest, blob never read
    assert (again.manifest_digest, again.diff_id, again.entries, again.files, again.blob_bytes) == \
        (first.manifest_digest, first.diff_id, first.entries, first.files, first.blob_bytes)
    # Without the digest it is read again, stores nothing new and keeps the manifest.
    third = convert(seaweed.endpoint, root, blob)
    assert third.existed and third.stored_bytes == 0 and third.manifest_digest == first.manifest_digest
    after = objects(seaweed.endpoint, root)
    assert {k for k in after if not k.startswith("blobs/")} == {k for k in keys if not k.startswith("blobs/")}


def test_cli_convert_layer(seaweed, tmp_path):
    root = new_root()
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(UPPER))
    r = p2pfs_cmd("image", "convert-layer", str(path), root, "--json", endpoint=seaweed.endpoint)
    out = json.loads(r.stdout)
    assert out["digest"] == sha(path.read_bytes()) and out["url"] == root and not out["existed"]
    assert out["files"] == 3 and out["diff_id"] == sha(UPPER)
    r = p2pfs_cmd("image", "convert-layer", str(path), root, endpoint=seaweed.endpoint)
    assert "converted before" in r.stdout
    (tmp_path / "bad").write_bytes(b"\x1f\x8b not gzip at all")
    r = p2pfs_cmd("image", "convert-layer", str(tmp_path / "bad"), root, endpoint=seaweed.endpoint,
                  check=False)
    assert r.returncode == 1 and "gzip" in r.stderr and "Traceback" not in r.stderr
    # BLAKE3 chunk digests by default (a v3 manifest); --chunk-hash sha256 gives a v2 one.
    old = new_root()
    r = p2pfs_cmd("image", "convert-layer", str(path), old, "--chunk-hash", "sha256", "--json",
                  endpoint=seaweed.endpoint)
    hex_ = json.loads(r.stdout)["digest"].removeprefix("sha256:")

    async def manifests(o):
        return [parse(await o.get(parse_url(u).prefix + f"{hex_}/.p2pfs/manifest.json"))
                for u in (root, old)]
    new_m, old_m = with_origin(seaweed.endpoint, manifests)
    assert (new_m.version, new_m.chunk_hash) == (3, "blake3")
    assert (old_m.version, old_m.chunk_hash) == (2, "sha256")
    assert [e.path for e in new_m.entries] == [e.path for e in old_m.entries]


# -- through a mount ----------------------------------------------------------------------

def lstat_of(p: Path) -> tuple:
    st = os.lstat(p)
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def file_sha(p: Path) -> str:
    return sha(p.read_bytes())


@pytest.fixture(scope="module")
def layers_mount(seaweed, layers, tmp_path_factory):
    from conftest import HAVE_FUSE, Mount
    if not HAVE_FUSE:
        pytest.skip("needs root and /dev/fuse for a real FUSE mount")
    base = tmp_path_factory.mktemp("layers-mount")
    (base / "mnt").mkdir()
    # The page push of the pack read-ahead is exercised here; a layer whose start-up reads
    # are being recorded is not pushed into (test_startup_prefetch), so recording is off.
    (base / "p2pfs.toml").write_text("[mount]\nerofs_page_push = true\nstartup_window = 0\n")
    m = Mount(layers["root"], base / "mnt", base / "cache", seaweed.endpoint,
              ["--config", str(base / "p2pfs.toml")]).start()
    yield m
    m.stop()


@needs_fuse
def test_mount_shows_each_layer_as_its_digest_dir(layers, layers_mount):
    mnt = layers_mount.path
    assert sorted(os.listdir(mnt)) == sorted([layers["base"].hex, layers["upper"].hex])
    L = mnt / layers["base"].hex
    R, D, S, B, F = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFBLK, stat.S_IFIFO
    expect = {
        "bin": (D, 0o755, 0, 0), "bin/busybox": (R, 0o755, 0, 0), "bin/sh": (S, 0o777, 0, 0),
        "usr/bin/passwd": (R, 0o4755, 0, 0), "usr/bin/wall": (R, 0o2711, 0, 5),
        "tmp": (D, 0o1777, 0, 0), "home/user": (D, 0o700, 1000, 1000),
        "home/user/.profile": (R, 0o644, 1000, 1000), "etc/shadow": (R, 0o640, 0, 42),
        "dev/null": (stat.S_IFCHR, 0o666, 0, 0), "dev/sda": (B, 0o660, 0, 6),
        "run/initctl": (F, 0o600, 0, 0), "empty": (D, 0o750, 0, 0), "usr": (D, 0o755, 0, 0),
    }
    for rel, want in expect.items():
        assert lstat_of(L / rel) == want, rel
    assert os.listdir(L / "empty") == []
    assert os.readlink(L / "bin/sh") == "busybox"
    assert os.lstat(L / "dev/null").st_rdev == os.makedev(1, 3)
    assert os.lstat(L / "dev/sda").st_rdev == os.makedev(8, 0)
    assert os.lstat(L / "big.bin").st_mtime == MTIME
    for rel, data in (("bin/busybox", BUSYBOX), ("big.bin", BIG), ("dup1", DUP), ("dup2", DUP),
                      ("var/lib/old/data", b"old"), ("caps", b"c")):
        assert file_sha(L / rel) == sha(data), rel
    with open(L / "big.bin", "rb") as f:  # a random read inside a later chunk
        f.seek(1000 * KiB + 5)
        assert f.read(300 * KiB) == BIG[1000 * KiB + 5 : 1300 * KiB + 5]
    ls, bb = os.lstat(L / "bin/ls"), os.lstat(L / "bin/busybox")
    assert ls.st_ino == bb.st_ino and bb.st_nlink == 2
    assert os.getxattr(L / "caps", "user.note") == b"hello"
    assert os.getxattr(L / "caps", "trusted.p2pfs") == b"t"


@needs_fuse
def test_mount_shows_whiteouts_and_opaque_dirs(layers, layers_mount):
    U = layers_mount.path / layers["upper"].hex
    wh = os.lstat(U / "etc/shadow")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(U / "var/lib", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(U / "var/lib")) == ["new"]
    assert (U / "added").read_bytes() == b"only here"


@needs_fuse
def test_overlayfs_over_the_layers_applies_whiteouts(layers, layers_mount, tmp_path):
    mnt = layers_mount.path
    target = tmp_path / "rootfs"
    target.mkdir()
    lower = f"{mnt / layers['upper'].hex}:{mnt / layers['base'].hex}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(target)],
                   check=True, capture_output=True)
    try:
        assert not (target / "etc/shadow").exists()  # whited out
        assert (target / "etc/hosts").exists()
        assert sorted(os.listdir(target / "var/lib")) == ["new"]  # opaque: old/ is hidden
        assert file_sha(target / "bin/busybox") == sha(BUSYBOX)
        assert (target / "added").read_bytes() == b"only here"
        assert os.readlink(target / "bin/sh") == "busybox"
        assert stat.S_IMODE(os.lstat(target / "usr/bin/passwd").st_mode) == 0o4755
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def test_a_store_failure_mid_conversion_stops_it(tmp_path):
    """The uploader fails while the worker thread waits to hand over the next pack: the
    store's error comes out (not a hang, not a group) and no manifest is written."""
    from p2pfs.errors import OriginUnavailable
    from p2pfs.origin import LocalDirOrigin

    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "blobs").write_bytes(b"a file where the packs' directory goes")
    root = parse_url(f"file://{tmp_path}//layers")

    async def main():
        with trio.fail_after(30):
            await convert_layer(LocalDirOrigin(tmp_path), root, lambda: io.BytesIO(BASE),
                                pack_size=64 * KiB)
    with pytest.raises(OriginUnavailable, match="blobs/"):
        trio.run(main)
    assert not list((tmp_path / "layers").rglob("manifest.json"))


# -- as EROFS -----------------------------------------------------------------------------

def tree_of(root: Path) -> dict[str, tuple]:
    """Everything a reader sees of a tree: per path its type, mode, owner, size, device,
    mtime, link count, link target, xattrs and content digest."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False)}
            body = (os.readlink(p) if stat.S_ISLNK(st.st_mode)
                    else file_sha(p) if stat.S_ISREG(st.st_mode) else None)
            out[str(p.relative_to(root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_rdev, st.st_mtime_ns, st.st_nlink, body, xattrs)
    return out


@contextlib.contextmanager
def erofs_layer(mnt: Path, hex_: str, target: Path):
    from p2pfs import erofs
    target.mkdir()
    erofs.mount(str(mnt / ".erofs" / f"{hex_}.img"), str(mnt / ".erofs" / f"{hex_}.blob"), str(target))
    try:
        yield target
    finally:
        erofs.unmount(str(target))


def needs_erofs():
    from p2pfs import erofs
    if not erofs.supported():
        pytest.skip("needs a kernel with EROFS file-backed mounts (Linux 6.12+)")


@needs_fuse
def test_each_layer_mounts_as_erofs_with_the_same_tree(layers, layers_mount, tmp_path):
    needs_erofs()
    mnt = layers_mount.path
    assert sorted(os.listdir(mnt)) == sorted([layers["base"].hex, layers["upper"].hex])
    for which in ("base", "upper"):
        hex_ = layers[which].hex
        with erofs_layer(mnt, hex_, tmp_path / which) as target:
            got, want = tree_of(target), tree_of(mnt / hex_)
            # An entry without an mtime (a parent the tar left out) shows the mount time
            # through FUSE and 0 (1970) through EROFS; everything else is identical.
            for rel, v in got.items():
                if v[5] == 0 and rel in want:
                    want[rel] = (*want[rel][:5], 0, *want[rel][6:])
            assert got == want, which
            assert os.statvfs(target).f_fsid != os.statvfs(mnt).f_fsid  # the kernel's own
            # Again from a cold page cache: the bytes the daemon pushed into the blob's page
            # cache (the pack read-ahead's, below) must be the same bytes.
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3")
            assert tree_of(target) == got, which
    assert sorted(os.listdir(mnt / ".erofs")) == sorted(
        f"{layers[w].hex}.{k}" for w in ("base", "upper") for k in ("img", "blob"))
    push = layers_mount.status()["page_push"]
    assert push["pushes"] > 0 and push["errors"] == 0, push


@needs_fuse
def test_overlayfs_over_erofs_layers_applies_whiteouts(layers, layers_mount, tmp_path):
    needs_erofs()
    mnt = layers_mount.path
    with erofs_layer(mnt, layers["base"].hex, tmp_path / "b") as base, \
            erofs_layer(mnt, layers["upper"].hex, tmp_path / "u") as upper:
        target = tmp_path / "rootfs"
        target.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={upper}:{base}",
                        str(target)], check=True, capture_output=True)
        try:
            assert not (target / "etc/shadow").exists()
            assert sorted(os.listdir(target / "var/lib")) == ["new"]
            assert file_sha(target / "bin/busybox") == sha(BUSYBOX)
            assert file_sha(target / "big.bin") == sha(BIG)
            assert (target / "added").read_bytes() == b"only here"
        finally:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_layer_too_big_for_an_erofs_image_is_refused(monkeypatch):
    from p2pfs import erofs
    from p2pfs.manifest import Entry, Manifest

    entries = (Entry(path="", type="dir"), *(Entry(path=f"d{i}", type="dir") for i in range(40)))
    m = Manifest(chunk_size=1 << 20, blobs=(), entries=entries, kind="layer", blob_root="..")
    assert len(erofs.build(m).meta) > 40 * erofs.BLOCK
    monkeypatch.setattr(erofs, "MAX_IMAGE", 16 * erofs.BLOCK)
    with pytest.raises(erofs.ErofsUnsupported, match="MiB"):
        erofs.build(m)
    bad = Manifest(chunk_size=1 << 20, blobs=(), kind="layer", blob_root="..",
                   entries=(Entry(path="", type="dir"),
                            Entry(path="f", type="file", xattrs={"system.nfs4_acl": b"x"})))
    with pytest.raises(erofs.ErofsUnsupported, match="name index"):
        erofs.build(bad)
