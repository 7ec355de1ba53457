"""gpuload without p2pfs (a replica's image holds only torch, numpy and safetensors): it
imports, loads local files, and reads a file on a p2pfs mount through the mount, quietly.
Each check runs in a fresh interpreter whose imports of p2pfs, click, trio, tqdm and pyfuse3
fail (a sys.meta_path finder), as they would where those are not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from conftest import needs_fuse, p2pfs_cmd
from gpuload_helpers import write

BLOCKED = ("p2pfs", "click", "trio", "tqdm", "pyfuse3")

PRELUDE = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocked())
"""

LOAD = PRELUDE + """
import hashlib, json
import gpuload
sd = gpuload.load_file(sys.argv[1])
digests = {k: hashlib.sha256(v.contiguous().view(-1).view(__import__("torch").uint8).numpy()).hexdigest()
           for k, v in sd.items()}
print(json.dumps({"digests": digests,
                  "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in %r)}))
""" % (BLOCKED,)


def _load_blocked(path: Path) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _digests(raw: dict[str, bytes]) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v).hexdigest() for k, v in raw.items()}


def test_the_block_works():
    """The prelude really makes those imports fail (else the tests below prove nothing)."""
    r = subprocess.run([sys.executable, "-c", PRELUDE + "import p2pfs"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_import_and_local_load_without_p2pfs(tmp_path: Path):
    raw = write(tmp_path / "m.safetensors", [("a", "F32", (64, 33)), ("b", "BF16", (7,))], seed=3)
    got, err = _load_blocked(tmp_path / "m.safetensors")
    assert got["digests"] == _digests(raw)
    assert got["loaded"] == []


@needs_fuse
def test_load_from_a_p2pfs_mount_without_p2pfs_reads_through_the_mount(
        tmp_path: Path, seaweed, mount_factory):
    """Before gpuload guarded its p2pfs import, a file on a FUSE mount made `mount_of` import
    the p2pfs client, and the load failed with ImportError."""
    src = tmp_path / "src"
    src.mkdir()
    raw = write(src / "model.safetensors", [("w", "F32", (512, 1024)), ("b", "F16", (3, 5))],
                seed=4)
    url = f"s3://models/standalone-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", str(src), url, endpoint=seaweed.endpoint)
    mount = mount_factory(url, seaweed.endpoint)
    on_mount = mount.path / "model.safetensors"
    assert os.major(os.stat(on_mount).st_dev) == 0  # a FUSE file: the p2pfs check runs
    got, err = _load_blocked(on_mount)
    assert got["digests"] == _digests(raw)
    assert got["loaded"] == []
    assert "prefetch" not in err and "Traceback" not in err, err
