"""The cache dir keeps what the mount's modes protect (issue 12, defect 5): directories 0700
(the cache dir 0711), files 0600, whatever the umask; an existing cache is tightened on
start; another user can read nothing in it, even bytes of a file the mount lets them read."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from p2pfs._perms import DIR_MODE, FILE_MODE, ROOT_MODE
from p2pfs.daemon import lock_cache_dir
from p2pfs.discover import ManifestCache
from p2pfs.diskcache import DiskCache
from p2pfs.manifest import Manifest
from p2pfs.origin import parse_url

from conftest import needs_fuse, p2pfs_cmd, wait_for

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (nobody)")


def fill_cache(cache: Path) -> list[str]:
    """Make a cache as the daemon does: lock file, manifest cache, chunks written both ways
    (an aligned buffer through O_DIRECT and plain bytes). Returns the chunk digests."""
    os.close(lock_cache_dir(cache))
    m = Manifest(chunk_size=1 << 20, blobs=(), entries=())
    ManifestCache(cache).save(parse_url("file:///models"), [("m", m, "m/")])
    c = DiskCache(cache, 1 << 20)
    c.scan()
    aligned = mmap.mmap(-1, 3 * 4096 + 5)
    aligned[:] = os.urandom(len(aligned))
    plain = os.urandom(1000)
    out = []
    for data in (memoryview(aligned), plain):
        d = hashlib.sha256(data).hexdigest()
        assert c.write(d, data)
        out.append(d)
    return out


def modes(cache: Path) -> dict[str, int]:
    """Permission bits of the cache dir and everything under it, by relative path."""
    out = {".": stat.S_IMODE(cache.lstat().st_mode)}
    for p in cache.rglob("*"):
        out[str(p.relative_to(cache))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(cache: Path) -> None:
    found = modes(cache)
    want = {rel: ROOT_MODE if rel == "." else DIR_MODE if (cache / rel).is_dir() else FILE_MODE
            for rel in found}
    assert found == want
    assert any(rel.startswith("manifests/") for rel in found) and "lock" in found
    assert "index" in found and "format" in found
    assert sum(1 for rel in found if rel.startswith("files/") and rel.count("/") == 2) == 2


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_a_new_cache_is_private_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        fill_cache(tmp_path / "cache")
    finally:
        os.umask(old)
    assert_private(tmp_path / "cache")


def test_an_existing_cache_is_tightened_on_start(tmp_path, caplog):
    """A cache left by an older p2pfs (0755 directories, 0644 files): the scan at start-up
    sets the modes, and says in one line how many it changed."""
    cache = tmp_path / "cache"
    digests = fill_cache(cache)
    (cache / "p2pfs.log").write_text("an old log\n")
    loose = 0
    for p in [cache, *cache.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
        loose += 1
    os.chmod(cache / "manifests", 0o777)
    (tmp_path / "notes").write_text("not ours")
    os.chmod(tmp_path / "notes", 0o644)
    os.symlink(tmp_path / "notes", cache / "notes")  # not ours: neither followed nor changed
    with caplog.at_level("INFO", logger="p2pfs.diskcache"):
        c = DiskCache(cache, 1 << 20)
        c.scan()
    assert stat.S_IMODE((tmp_path / "notes").stat().st_mode) == 0o644
    (cache / "notes").unlink()
    assert_private(cache)
    lines = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert len(lines) == 1 and f"modes of {loose} entries" in lines[0], lines
    assert all(d in c for d in digests)
    caplog.clear()
    DiskCache(cache, 1 << 20).scan()  # nothing left to change: nothing said
    assert not [r for r in caplog.records if "other users" in r.getMessage()]


def test_a_stricter_cache_dir_is_left_so(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o700)
    fill_cache(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def as_nobody(paths: list[Path]) -> dict[str, str]:
    """What user nobody gets trying to read (a file) or list (a directory) each path: "ok"
    or the errno name. Runs the system python as a subprocess under uid/gid 65534."""
    code = """
import errno, json, os, sys
out = {}
for p in json.loads(sys.argv[1]):
    try:
        if os.path.isdir(p):
            os.listdir(p)
        else:
            with open(p, "rb") as f:
                f.read(1)
        out[p] = "ok"
    except OSError as exc:
        out[p] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""
    r = subprocess.run(["/usr/bin/python3", "-c", code, json.dumps([str(p) for p in paths])],
                       user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                       text=True, timeout=30, check=True)
    return json.loads(r.stdout)


@pytest.fixture
def open_dir():
    """A directory every user may enter (0755), unlike pytest's tmp_path (0700)."""
    d = Path(tempfile.mkdtemp(prefix="p2pfs-modes-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_another_user_reads_nothing_in_the_cache(open_dir):
    cache = open_dir / "cache"
    fill_cache(cache)
    entries = [cache, *sorted(cache.rglob("*"))]
    got = as_nobody(entries)
    assert got[str(cache)] == "EACCES"  # 0711: may pass through, may not list
    assert {p: e for p, e in got.items() if e != "EACCES"} == {}


@needs_root
@needs_fuse
def test_a_file_denied_on_the_mount_is_denied_in_the_cache(seaweed, open_dir, mount_factory):
    """The issue's reproduction, end to end: `secret.bin` is 0600 on the mount, so nobody
    cannot read it there; nor, after root has read it, any of its bytes in the cache dir
    (before the fix the chunk files were 0644 in 0755 directories). The daemon's log and
    the manifest cache are private too."""
    src = open_dir / "src"
    src.mkdir()
    secret = os.urandom(3 << 20)
    (src / "secret.bin").write_bytes(secret)
    os.chmod(src / "secret.bin", 0o600)
    (src / "public.txt").write_text("anyone may read this\n")
    os.chmod(src / "public.txt", 0o644)
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), "s3://models/modes/m",
              endpoint=seaweed.endpoint)
    mnt, cache = open_dir / "mnt", open_dir / "cache"
    m = mount_factory("s3://models/modes/m", seaweed.endpoint, mountpoint=mnt, cache_dir=cache)
    assert (m.path / "secret.bin").read_bytes() == secret  # root reads it: now cached
    got = as_nobody([m.path / "secret.bin", m.path / "public.txt"])
    assert got == {str(m.path / "secret.bin"): "EACCES", str(m.path / "public.txt"): "ok"}
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    public = (src / "public.txt").read_bytes()
    data_files = sorted((p for p in (cache / "files").rglob("*") if p.is_file()),
                        key=lambda p: p.stat().st_size)
    assert [p.read_bytes() for p in data_files] == [public, secret]  # their local copies
    entries = sorted(p for p in cache.rglob("*") if not p.is_socket())
    assert cache / "p2pfs.log" in entries and any(p.parent.name == "manifests" for p in entries)
    got = as_nobody(entries)
    assert {p: e for p, e in got.items() if e != "EACCES"} == {}
    assert_modes = {str(p.relative_to(cache)): stat.S_IMODE(p.lstat().st_mode) for p in entries}
    assert {r: md for r, md in assert_modes.items()
            if md != (DIR_MODE if (cache / r).is_dir() else FILE_MODE)} == {}
