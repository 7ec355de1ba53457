"""Integration: models (image layers) published after a mount appear on it without a
remount (`p2pfs refresh`), and what was mounted keeps serving (real SeaweedFS + FUSE)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from conftest import needs_fuse, p2pfs_cmd

pytestmark = needs_fuse


def publish(tmp_path, seaweed, url: str, name: str, body: bytes) -> None:
    src = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    (src / name).write_bytes(body)
    p2pfs_cmd("publish", str(src), url, endpoint=seaweed.endpoint)


def test_refresh_attaches_new_models_and_keeps_open_files(seaweed, mount_factory, tmp_path):
    url = f"s3://models/refresh-{uuid.uuid4().hex[:6]}"
    publish(tmp_path, seaweed, f"{url}/one", "a.txt", b"first")
    m = mount_factory(url, seaweed.endpoint)
    held = open(m.path / "one" / "a.txt", "rb")
    ino = os.fstat(held.fileno()).st_ino
    try:
        publish(tmp_path, seaweed, f"{url}/two", "b.txt", b"second")
        publish(tmp_path, seaweed, f"{url}/three", "c.txt", b"third")
        assert not (m.path / "two").exists()

        # One named path: only that model is looked up and attached.
        r = json.loads(p2pfs_cmd("refresh", str(m.path), "two", "nope", "--json").stdout)
        assert r["added"] == ["two"] and r["ok"]
        assert any("nope" in p for p in r["problems"])
        assert (m.path / "two" / "b.txt").read_bytes() == b"second"
        assert not (m.path / "three").exists()

        # No paths: the whole prefix is listed again; what is there already is left alone.
        r = json.loads(p2pfs_cmd("refresh", str(m.path), "--json").stdout)
        assert r["added"] == ["three"] and r["models"] == 3
        assert sorted(os.listdir(m.path)) == ["one", "three", "two"]
        assert (m.path / "three" / "c.txt").read_bytes() == b"third"
        assert held.read() == b"first" and os.stat(m.path / "one" / "a.txt").st_ino == ino
        assert {x["path"] for x in m.status()["models"]} == {"one", "two", "three"}

        r = json.loads(p2pfs_cmd("refresh", str(m.path), "--json").stdout)
        assert r["added"] == []
    finally:
        held.close()


@pytest.mark.parametrize("path", ["../escape", "/", "a/./b"])
def test_refresh_refuses_paths_outside_the_mount(seaweed, mount_factory, tmp_path, path):
    url = f"s3://models/refresh-{uuid.uuid4().hex[:6]}"
    publish(tmp_path, seaweed, f"{url}/one", "a.txt", b"x")
    m = mount_factory(url, seaweed.endpoint)
    r = p2pfs_cmd("refresh", str(m.path), path, check=False)
    assert r.returncode != 0 and ("normalized" in r.stderr or "root" in r.stderr)


def test_an_empty_prefix_mounts_with_allow_empty_and_fills_by_refresh(seaweed, mount_factory, tmp_path):
    url = f"s3://models/refresh-{uuid.uuid4().hex[:6]}"
    mp = tmp_path / "plain"
    mp.mkdir()
    r = p2pfs_cmd("mount", url, str(mp), "--cache-dir", str(tmp_path / "c"), check=False,
                  endpoint=seaweed.endpoint)
    assert r.returncode != 0 and "no p2pfs manifest" in r.stderr
    m = mount_factory(url, seaweed.endpoint, "--allow-empty")
    assert os.listdir(m.path) == []
    publish(tmp_path, seaweed, f"{url}/layer1", "f", b"data")
    r = json.loads(p2pfs_cmd("refresh", str(m.path), "--json").stdout)
    assert r["added"] == ["layer1"]
    assert (m.path / "layer1" / "f").read_bytes() == b"data"
