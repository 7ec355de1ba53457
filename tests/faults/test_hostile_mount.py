"""Hostile manifests on a real mount: a prefix holding one good model and hostile ones
from the corpus. The good model serves correct bytes, `ls -lR` ends, every hostile model
is either skipped with a one-line reason or mounted, and what it serves is exactly what
its digests promise (or an EIO within the read bound); the daemon stays alive, answers
status, and its memory stays within its settings.

The corpus is mounted in groups, one per defect of issue 12 it exposed (a group whose
defect it exposed is recorded in corpus/INDEX.json), and once all together."""

from __future__ import annotations

import errno
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_fuse
from p2pfs.errors import ManifestError
from p2pfs.manifest import Entry, chunk_digest, parse

from .conftest import (CORPUS, EIO_SLACK_S, FIGURES, MiB, assert_served, check_daemon, good_model,
                       put_objects, read_file)

pytestmark = needs_fuse
INDEX: dict[str, dict[str, Any]] = json.loads((CORPUS / "INDEX.json").read_text())
BLOBS = {"data": (CORPUS / "data.bin").read_bytes(), "bomb.zst": (CORPUS / "bomb.zst").read_bytes()}
READ_TIMEOUT = 3.0
PERMANENT_S = 1.0  # an error no retry can mend fails at once
SMALL = 4 * MiB  # files up to this size are read whole; larger ones, their first 64 KiB


def _group(defects: list[int]) -> str:
    return f"defect{defects[0]}" if defects else "clean"


GROUPS: dict[str, list[str]] = {}
for _name, _case in INDEX.items():
    GROUPS.setdefault(_group(_case["defects"]["mount"]), []).append(_name)


def _marks(group: str) -> list:
    """Marks for a group: none now that every defect the corpus records is fixed (the
    INDEX keeps which defect each case exposed, for the record)."""
    return []


ALL_DEFECTS = sorted({d for c in INDEX.values() for d in c["defects"]["mount"] if d})


@pytest.fixture(scope="module")
def hostile_store(seaweed, tmp_path_factory) -> dict[str, Any]:
    """Under one prefix per group (and one holding every case): the good model, published
    by `p2pfs publish`'s code, and each corpus case with the blobs it points into."""
    import trio
    import trio_asyncio

    from p2pfs.config import S3Config
    from p2pfs.origin import parse_url
    from p2pfs.origin._s3 import S3Origin
    from p2pfs.publish import publish

    src = tmp_path_factory.mktemp("good")
    files = good_model(src)
    root = f"hostile-{uuid.uuid4().hex[:8]}"
    groups = {**GROUPS, "all": list(INDEX)}

    async def main() -> None:
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=seaweed.endpoint))
            try:
                for g in groups:
                    await publish(o, src, parse_url(f"s3://models/{root}/{g}/good"), chunk_size=MiB)
            finally:
                await o.aclose()

    trio.run(main)
    objects = {}
    for g, names in groups.items():
        for name in names:
            base = f"{root}/{g}/{name}/"
            objects[base + ".p2pfs/manifest.json"] = (CORPUS / f"{name}.json").read_bytes()
            for key, value in BLOBS.items():
                objects[base + key] = value
    put_objects(seaweed.endpoint, "models", objects)
    return {"url": f"s3://models/{root}", "files": files}


def verify_served(entry: Entry, data: bytes) -> str | None:
    """Why `data`, served as the whole of `entry`, is wrong; None if every chunk matches
    its digest (content addressing: any bytes with that digest are right)."""
    if len(data) != entry.size:
        return f"{len(data)} bytes of a {entry.size}-byte file"
    for start, ref in zip(entry.starts, entry.chunks):
        if chunk_digest(ref.hash, data[start:start + ref.size]) != ref.digest:
            return f"the chunk at {start} does not match its digest"
    return None


def _list_files(root: Path) -> list[Path]:
    r = subprocess.run(["find", str(root), "-type", "f"], capture_output=True, timeout=60)
    return [Path(p.decode("utf-8", "surrogateescape")) for p in r.stdout.splitlines()]


def _exercise(mount_factory, seaweed, store: dict[str, Any], group: str, names: list[str],
              tmp: Path) -> None:
    m = mount_factory(f"{store['url']}/{group}", seaweed.endpoint, "--memory-size", "32MiB",
                      "--read-timeout", str(READ_TIMEOUT))
    problems = m.info.get("problems", [])
    for p in problems:
        assert "\n" not in p and "Traceback" not in p and len(p) < 8192, f"not a one-line reason: {p[:300]!r}"

    ls = subprocess.run(["ls", "-lR", str(m.path)], capture_output=True, timeout=60)
    listing = ls.stdout.decode("utf-8", "replace")
    assert "weights.bin" in listing and "config.json" in listing, ls.stderr.decode()[:2000]
    for name, data in store["files"].items():
        assert_served(m.path / "good" / name, data)

    mounted = {p.name for p in m.path.iterdir()}
    for name in names:
        raw = (CORPUS / f"{name}.json").read_bytes()
        try:
            manifest = parse(raw, source=name)
        except ManifestError:
            manifest = None
        if manifest is None or name not in mounted:
            assert name not in mounted, f"{name}: refused by parse, yet mounted"
            assert any(name in p for p in problems), f"{name}: skipped without a reason in {problems}"
            continue
        by_path = {e.path: e for e in manifest.files()}
        by_path.update({e.path: by_path[e.target] for e in manifest.entries if e.type == "hardlink"})
        for path in _list_files(m.path / name):
            rel = path.relative_to(m.path / name).as_posix()
            entry = by_path.get(rel)
            assert entry is not None, f"{name}: {rel!r} is served but not in the manifest"
            if len(bytes(path)) >= 4096:
                continue  # PATH_MAX: no program can open it by this name (listed by ls -lR)
            whole = entry.size <= SMALL
            copy = tmp / "copy"
            r = read_file(path, length=-1 if whole else 64 * 1024, timeout=3 * READ_TIMEOUT + 20,
                          copy=copy)
            FIGURES.ran("hostile file reads (mounted)")
            assert not r.hung, f"{name}/{rel}: the read hung"
            if r.ok:
                data = copy.read_bytes()
                if whole:
                    wrong = verify_served(entry, data)
                else:  # of the corpus's huge files only the bomb has bytes: zeros
                    wrong = None if data == bytes(len(data)) else "not the bomb's zeros"
                assert wrong is None, f"{name}/{rel}: wrong bytes served: {wrong}"
            else:
                assert r.errno == errno.EIO, f"{name}/{rel}: errno {r.errno}, signal {r.signal}"
                # A blob shorter than its manifest says is that manifest's permanent error,
                # not an outage to retry through (defect 9).
                bound = PERMANENT_S if INDEX[name]["class"] == "short-blob" else READ_TIMEOUT + EIO_SLACK_S
                FIGURES.eio_latency(f"hostile manifest {name}", r.seconds, bound)
                assert r.seconds <= bound, f"{name}/{rel}: EIO after {r.seconds:.1f}s (bound {bound}s)"
        FIGURES.survived("hostile manifest mounted")
    check_daemon(m, f"hostile manifests: {group}")
    FIGURES.ran("manifest corpus (mounted)", len(names))
    FIGURES.survived("hostile manifest skipped", sum(1 for n in names if n not in mounted))


@pytest.mark.parametrize("group", [pytest.param(g, marks=_marks(g)) for g in GROUPS])
def test_hostile_group_beside_a_good_model(group, hostile_store, seaweed, mount_factory, tmp_path):
    _exercise(mount_factory, seaweed, hostile_store, group, GROUPS[group], tmp_path)


def test_every_hostile_manifest_under_one_prefix(hostile_store, seaweed, mount_factory, tmp_path):
    _exercise(mount_factory, seaweed, hostile_store, "all", list(INDEX), tmp_path)
