"""End to end, with real parts only: a docker-registry, SeaweedFS, p2pfs FUSE mounts,
p2pfs-snapshotter processes and containerd + runc (Debian's), all on loopback under temp
dirs. An image built in the test is pushed; node 1 pulls it normally (through CRI, as
kubelet does) and converts its layers in the background; node 2 (fresh containerd root,
fresh p2pfs cache) then starts it lazily from the object store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import pytest

from conftest import needs_fuse, wait_for
from p2pfs import erofs
from snapshotter._erofs import mounts_under
from containerd_helpers import HAVE_CONTAINERD, containerd_factory  # noqa: F401 - fixture
from image_helpers import build_image, busybox_image, oci_blob, oci_manifest, push, registry  # noqa: F401
from image_node import SNAPSHOTTER, ImageNode, first_pull_converted

pytestmark = [needs_fuse, pytest.mark.skipif(not HAVE_CONTAINERD, reason="needs root, containerd and runc")]

MiB = 1 << 20
BIG = 24 * MiB  # a file no start-up reads: the lazy node must not fetch it


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """busybox's three layers (every entry type, a whiteout, an opaque dir) plus a fourth
    with a big file that nothing reads at start-up."""
    tmp = tmp_path_factory.mktemp("img")
    base = busybox_image(tmp / "bb")
    big = tmp / "layer-big"
    (big / "opt" / "model").mkdir(parents=True)
    (big / "opt" / "model" / "weights.bin").write_bytes(random.Random(7).randbytes(BIG))
    (big / "opt" / "model" / "README").write_text("weights\n")
    oci = tmp / "oci"
    build_image(oci, "v1", [*base.layer_dirs, big])
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    push(oci, "v1", registry, name)
    manifest = oci_manifest(oci, "v1")
    config = json.loads(oci_blob(oci, manifest["config"]["digest"]))
    return {"ref": f"{registry.host}/{name}:v1", "layers": manifest["layers"],
            "diff_ids": config["rootfs"]["diff_ids"], "size": sum(l["size"] for l in manifest["layers"])}


def chain_ids(diff_ids: list[str]) -> list[str]:
    out = [diff_ids[0]]
    for d in diff_ids[1:]:
        out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def facts(root: Path) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    """Every path under `root`: (type, mode, uid, gid, size, link target or content hash,
    rdev, xattrs); and the hard-link groups."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            what: object = None
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for k in os.listxattr(p, follow_symlinks=False):
                    xattrs[k] = os.getxattr(p, k, follow_symlinks=False)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        size, what, rdev, tuple(sorted(xattrs.items())))
    return out, {frozenset(g) for g in inodes.values() if len(g) > 1}


def rootfs_facts(node: ImageNode, top_chain: str, tmp: Path) -> tuple[dict, set]:
    """Mount a read-only view of the image's top layer as the snapshotter gives it to
    containerd, and read every path's facts."""
    key = f"cmp-{uuid.uuid4().hex[:6]}"
    r = node.containerd.ctr("snapshots", "--snapshotter", "p2pfs", "view", "--mounts", key, top_chain)
    mounts = [{k.lower(): v for k, v in m.items()} for m in json.loads(r.stdout)]  # Go field names
    assert len(mounts) == 1 and mounts[0]["type"] == "overlay", mounts
    opts = [o for o in mounts[0]["options"] if o.startswith("lowerdir=")]
    target = tmp / key
    target.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro," + ",".join(opts), str(target)],
                   check=True, capture_output=True, timeout=30)
    try:
        return facts(target)
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)
        node.containerd.ctr("snapshots", "--snapshotter", "p2pfs", "rm", key)


def test_first_pull_converts_and_a_fresh_node_starts_lazily(
        image, registry, seaweed, mount_factory, containerd_factory, tmp_path):  # noqa: F811
    url = f"s3://models/layers-{uuid.uuid4().hex[:6]}"
    kw = dict(layers_url=url, endpoint=seaweed.endpoint, registry_host=registry.host,
              mount_factory=mount_factory, containerd_factory=containerd_factory)
    port = _free_port()
    node1 = first_pull_converted("node1", tmp_path, [l["digest"] for l in image["layers"]],
                                 image["ref"], snapshotter_args=("--metrics-addr", f"127.0.0.1:{port}"),
                                 **kw)
    log1 = node1.snapshotter.log_text()
    assert log1.count("pulled normally") >= len(image["layers"]), log1[-2000:]
    st = json.loads(subprocess.run([*SNAPSHOTTER, "status", "--metrics-addr", f"127.0.0.1:{port}",
                                    "--json"], capture_output=True, text=True, check=True).stdout)
    assert st["layers"] == {"remote": 0, "local": len(image["layers"])}, st
    assert st["conversions"]["converted"] == len(image["layers"]) and not st["conversions"]["failed"]
    assert st["object_store"] == "open", st
    text = subprocess.run([*SNAPSHOTTER, "status", "--metrics-addr", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, check=True).stdout
    assert "object store open" in text, text
    out = node1.containerd.run_container(image["ref"], "n1", ["/bin/cat", "/etc/app/c.conf"])
    assert out.output.strip() == "c=3"

    node2 = ImageNode("node2", tmp_path, **kw)
    node2.pull(image["ref"])
    log2 = node2.snapshotter.log_text()
    assert log2.count("served remotely") == len(image["layers"]), log2[-2000:]
    registry.stop()  # the lazy node needs the object store only from here on
    try:
        at_first: list[int] = []
        res = node2.containerd.run_container(image["ref"], "n2", ["/bin/echo", "started"],
                                             on_first_output=lambda: at_first.append(node2.origin_bytes()))
        assert res.output.strip() == "started"
        assert at_first and at_first[0] < image["size"] / 4, (at_first, image["size"])
        assert at_first[0] < BIG / 8
    finally:
        registry.start()

    top = chain_ids(image["diff_ids"])[-1]
    normal = rootfs_facts(node1, top, tmp_path)
    lazy = rootfs_facts(node2, top, tmp_path)
    if erofs.supported():  # the lazy node's layers are EROFS mounts of the p2pfs files
        assert len(mounts_under(node2.snapshotter.root)) == len(image["layers"]), \
            node2.snapshotter.log_text()[-2000:]
    assert "etc/hello.txt" not in normal[0] and "etc/app/c.conf" in normal[0]  # whiteouts applied
    assert sorted(p for p in normal[0] if p.startswith("etc/app/")) == ["etc/app/c.conf"]  # opaque
    missing = normal[0].keys() - lazy[0].keys()
    extra = lazy[0].keys() - normal[0].keys()
    assert not missing and not extra, (sorted(missing)[:20], sorted(extra)[:20])
    differ = {p: (normal[0][p], lazy[0][p]) for p in normal[0] if normal[0][p] != lazy[0][p]}
    assert not differ, list(differ.items())[:10]
    assert normal[1] == lazy[1] and normal[1], "hard-link groups"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_digest(node: ImageNode, ref: str) -> str:
    """The digest containerd's image record for `ref` targets (what the tag resolved to)."""
    for line in node.containerd.ctr("images", "ls").stdout.splitlines()[1:]:
        words = line.split()
        if words and words[0] == ref:
            return words[2]
    raise AssertionError(f"{ref} not in {node.name}'s images")


def test_registry_stopped_a_fresh_node_pulls_through_the_mirror(
        image, registry, seaweed, mount_factory, containerd_factory, tmp_path):  # noqa: F811
    """Node 1 pulls normally: its layers are converted and the image's manifest, config and
    tag stored in the object store. The registry stops. Node 2 (fresh, the mirror as its
    hosts.toml fallback) resolves the tag and fetches manifest and config from its
    snapshotter's mirror, every layer from the p2pfs mount, and runs the image."""
    url = f"s3://models/layers-{uuid.uuid4().hex[:6]}"
    kw = dict(layers_url=url, endpoint=seaweed.endpoint, registry_host=registry.host,
              mount_factory=mount_factory, containerd_factory=containerd_factory)
    node1 = first_pull_converted("node1", tmp_path, [l["digest"] for l in image["layers"]],
                                 image["ref"], **kw)
    wait_for(lambda: "manifest, config and tag stored for the mirror" in node1.snapshotter.log_text(),
             timeout=30, what="image metadata stored")
    expected = _image_digest(node1, image["ref"])

    mirror = f"127.0.0.1:{_free_port()}"
    node2 = ImageNode("node2", tmp_path, **kw, snapshotter_args=("--mirror-addr", mirror),
                      mirrors={registry.host: mirror})
    registry.stop()
    try:
        pulled = node2.pull(image["ref"])
        log2 = node2.snapshotter.log_text()
        assert log2.count("served remotely") == len(image["layers"]), log2[-3000:]
        # containerd asked the registry first (refused), then the mirror, naming the registry
        # (containerd 1.6 sends ns=127.0.0.1%3APORT).
        name = image["ref"].removeprefix(registry.host + "/").split(":")[0]
        ns = urllib.parse.quote(registry.host, safe="")
        assert f"HEAD /v2/{name}/manifests/v1?ns={ns} -> 200" in log2, log2[-3000:]
        assert _image_digest(node2, image["ref"]) == expected  # the same image, by the same digest
        res = node2.containerd.run_container(image["ref"], "n2", ["/bin/cat", "/etc/app/c.conf"])
        assert res.output.strip() == "c=3"
    finally:
        registry.start()
    # With the registry back, a pull resolves upstream: the mirror is not asked again.
    served = node2.snapshotter.log_text().count("mirror: ")
    node2.pull(image["ref"])
    assert node2.snapshotter.log_text().count("mirror: ") == served
    print(f"pull through the mirror: {pulled['seconds']:.2f}s")
