"""bench/images.py's layer writer (the benchmark images themselves are built by the benchmark,
not here): an overlay upper dir becomes an OCI layer with OCI whiteouts, and the OCI layout
it writes is consistent."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import images  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for an overlay mount")


def _members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name: m for m in tar}


@needs_root
def test_overlay_upper_becomes_an_oci_layer(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "CACHE", tmp_path / "cache")
    images._init_layout()
    lower = tmp_path / "lower"
    (lower / "etc" / "app").mkdir(parents=True)
    (lower / "etc" / "app" / "old.conf").write_text("old\n")
    (lower / "etc" / "gone.txt").write_text("bye\n")
    (lower / "proc").mkdir()
    home = tmp_path / "home"
    upper = home / "tree"
    upper.mkdir(parents=True)

    def change(root: Path) -> None:
        (root / "etc" / "gone.txt").unlink()                 # -> etc/.wh.gone.txt
        shutil.rmtree(root / "etc" / "app")                  # removed and made again:
        (root / "etc" / "app").mkdir()                       # -> opaque etc/app
        (root / "etc" / "app" / "new.conf").write_text("new\n")
        (root / "bin").mkdir()
        (root / "bin" / "tool").write_text("#!/bin/sh\n")
        os.chmod(root / "bin" / "tool", 0o4755)
        os.link(root / "bin" / "tool", root / "bin" / "tool2")
        os.setxattr(root / "bin" / "tool", "user.p2pfs", b"x")

    images._in_overlay(home, upper, [lower], change)
    layer = images._write_layer(upper, "test step")
    blob = (images.CACHE / "oci" / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    assert layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and layer.size == len(blob)
    assert layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    members = _members(blob)
    assert members["etc/.wh.gone.txt"].isreg() and members["etc/.wh.gone.txt"].size == 0
    assert "etc/gone.txt" not in members
    assert "etc/app/.wh..wh..opq" in members and "etc/app/new.conf" in members
    assert not any("trusted.overlay" in k for m in members.values() for k in m.pax_headers)
    assert members["bin/tool"].mode == 0o4755
    assert members["bin/tool2"].islnk() and members["bin/tool2"].linkname == "bin/tool"
    assert members["bin/tool"].pax_headers.get("SCHILY.xattr.user.p2pfs") == "x"
    assert "proc" not in members  # the /proc mounted during the step is not in the layer
    names = list(members)
    assert names.index("etc/app") < names.index("etc/app/.wh..wh..opq") < names.index("etc/app/new.conf")


def test_layout_index_manifest_config_agree(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "CACHE", tmp_path / "cache")
    images._init_layout()
    trees = []
    for i in range(2):
        tree = tmp_path / f"t{i}"
        tree.mkdir()
        (tree / f"f{i}").write_text(f"layer {i}\n")
        trees.append(images._write_layer(tree, f"step {i}"))
    digest = images._write_image("img-abc", trees, ["true"])
    images._write_image("img-abc", trees, ["true"])  # same tag again: replaced, not added
    oci = images.CACHE / "oci"
    index = json.loads((oci / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]
    manifest = json.loads((oci / "blobs" / "sha256" / digest[7:]).read_text())
    assert [d["digest"] for d in manifest["layers"]] == [t.digest for t in trees]
    assert [d["size"] for d in manifest["layers"]] == [t.size for t in trees]
    config = json.loads((oci / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    assert config["rootfs"]["diff_ids"] == [t.diff_id for t in trees]
    assert config["config"]["Cmd"] == ["true"]


def test_a_bench_nodes_config_is_the_shipped_node_settings_with_probes_merged_over():
    import tomllib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_images

    shipped = (Path(__file__).resolve().parent.parent / "deploy/kubernetes/configmap.yaml").read_text()
    assert "memory_prefault = true" in shipped  # NODE_SETTINGS says what the nodes run
    text = bench_images.node_toml({"mount": {"startup_window": 5.0}},
                                  '[cache]\nwriteback_bytes = 0\n[fetch]\npack_readahead = "1MiB"\n')
    assert tomllib.loads(text) == {"cache": {"memory_prefault": True, "writeback_bytes": 0},
                                   "mount": {"startup_window": 5.0},
                                   "fetch": {"pack_readahead": "1MiB"}}
    over = bench_images.node_toml({}, "[cache]\nmemory_prefault = false\n")
    assert tomllib.loads(over)["cache"] == {"memory_prefault": False}
