"""gpuload on a real p2pfs mount: SeaweedFS on loopback, `p2pfs publish`, `p2pfs mount`,
then `gpuload warm` and loads through the mount (with the prefetch hint). Needs root and
/dev/fuse; skips and says so otherwise."""

from __future__ import annotations

import os
import time
import subprocess
import sys

import pytest
import torch

import gpuload
from gpuload import _p2pfs
from gpuload_helpers import write

pytestmark = [pytest.mark.fuse, pytest.mark.s3, pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="needs root and /dev/fuse for a real FUSE mount")]


def p2pfs(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pfs", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    seaweed = pytest.importorskip("p2pfs.seaweed")
    try:
        seaweed.find_weed()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("p2pfs")
    src = root / "src" / "tiny"
    src.mkdir(parents=True)
    # Two shards of ~12 MiB: several 4 MiB chunks each, so prefetch and reads interleave.
    write(src / "model-00001-of-00002.safetensors",
          [(f"a{i}", "BF16", (1024, 1536)) for i in range(4)], seed=1)
    write(src / "model-00002-of-00002.safetensors",
          [(f"b{i}", "F32", (1000, 777)) for i in range(4)] + [("z", "U8", (0,))], seed=2)
    import json
    wm = {**{f"a{i}": "model-00001-of-00002.safetensors" for i in range(4)},
          **{f"b{i}": "model-00002-of-00002.safetensors" for i in range(4)},
          "z": "model-00002-of-00002.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # Another model with a file nothing else reads (three chunks and a bit), for open_local.
    (root / "src" / "other").mkdir()
    (root / "src" / "other" / "notes.bin").write_bytes(os.urandom(3 * (4 << 20) + 12345))
    # weed takes its S3 identity from the environment it starts in, and create_bucket signs
    # in this process: both need the credentials; we put the environment back afterwards.
    creds = {"AWS_ACCESS_KEY_ID": "gpuload", "AWS_SECRET_ACCESS_KEY": "gpuload",
             "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    server = seaweed.SeaweedServer(root / "weed")
    mnt = root / "mnt"
    mnt.mkdir()
    mounted_ok = False
    try:
        server.start()
        env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint}
        server.create_bucket("models")
        for name in ("tiny", "other"):
            r = p2pfs("publish", root / "src" / name, f"s3://models/{name}", env=env)
            assert r.returncode == 0, r.stderr
        r = p2pfs("mount", "s3://models", mnt, "--cache-dir", root / "cache", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        mounted_ok = True
        yield src, mnt / "tiny"
    finally:
        if mounted_ok:
            p2pfs("unmount", mnt, env=env)
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _same(got: dict, want: dict) -> bool:
    return sorted(got) == sorted(want) and all(
        torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
        for k in want)


def test_cold_load_through_the_mount_with_prefetch(mounted):
    """First touch of the files: loads read through FUSE while the prefetch hint runs."""
    src, model = mounted
    assert _p2pfs.mount_of(model) is not None and _p2pfs.mount_of(src) is None
    shard = model / "model-00002-of-00002.safetensors"
    with _p2pfs.Prefetcher([shard, src / "model-00001-of-00002.safetensors"]) as pf:
        assert pf.paths == [shard]  # only files on p2pfs get a hint
    assert pf.error is None
    want = gpuload.load(src)
    assert _same(gpuload.load(model), want)  # shard 1 cold, with gpuload's own hint
    assert _same(gpuload.load(model, copy=True), want)
    assert _same(dict(gpuload.iter_tensors(model, copy=True, segment_size=1 << 20)), want)


def test_warm_cli_on_a_real_mount(mounted, capsys):
    import json

    from gpuload.cli import main

    src, model = mounted
    try:
        main(["warm", str(model), "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert res["p2pfs"] is True and res["ok"] is True and res["done"] == res["total"] > 0
    with pytest.raises(gpuload.PrefetchError, match="not on a p2pfs mount"):
        gpuload.warm(src)


def _fill_bytes(mnt) -> int:
    r = p2pfs("status", "--json", mnt, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    import json
    return json.loads(r.stdout)["fill_bytes"]


def test_cpu_loads_are_filled_by_the_daemon_unless_told_not_to(mounted):
    """On p2pfs, CPU loads have the daemon write each shard into gpuload's memory (no FUSE
    in the data path); fill=False reads through the mount. Both give the same tensors, and
    the tensors are ours: writing to them changes neither the file nor a later load."""
    src, model = mounted
    want = gpuload.load(src)
    before = _fill_bytes(model.parent)
    got = gpuload.load(model, local=False)  # earlier tests made the files local
    shards = sorted(model.glob("*.safetensors"))
    assert _fill_bytes(model.parent) - before >= sum(p.stat().st_size for p in shards)
    assert _same(got, want)
    got["a0"].zero_()
    streamed = dict(gpuload.iter_tensors(model, local=False))
    assert _same(streamed, want)

    before = _fill_bytes(model.parent)
    assert _same(gpuload.load(model, fill=False, local=False), want)
    assert _same(gpuload.load_file(shards[1], fill=False, copy=True, local=False),
                 {k: v for k, v in want.items() if not k.startswith("a")})
    assert _fill_bytes(model.parent) == before


def _status(mnt) -> dict:
    import json
    r = p2pfs("status", "--json", mnt, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_whole_local_copy_is_loaded_from_local_disk(mounted):
    """Once every chunk of a shard is on the daemon's disk and checked (sealed), a load is
    handed the local copy (`open` over the control socket) and maps it like a local file:
    neither fill nor FUSE carries a byte. Its tensors are the file's, and ours: writing to
    them changes neither the cached copy nor a later load."""
    src, model = mounted
    want = gpuload.load(src)
    gpuload.warm(model)
    shards = sorted(model.glob("*.safetensors"))
    deadline = time.monotonic() + 30
    while _status(model.parent)["cache_sealed_files"] < len(shards):
        assert time.monotonic() < deadline, "the warmed files were never sealed"
        time.sleep(0.1)
    before = _status(model.parent)
    got = gpuload.load(model)
    after = _status(model.parent)
    assert _same(got, want)
    assert after["local_opens"] - before["local_opens"] == len(shards)
    assert after["local_open_bytes"] - before["local_open_bytes"] == sum(p.stat().st_size for p in shards)
    assert after["fill_bytes"] == before["fill_bytes"]
    assert after["read_bytes"] == before["read_bytes"]
    got["a0"].zero_()  # a private mapping: the copy on disk stays as it was
    assert _same(gpuload.load(model), want)
    assert _same(gpuload.load(model, copy=True), want)


def test_open_local_hands_out_only_whole_checked_copies(mounted):
    """`open` answers not_local (None) until every chunk of the file is on local disk and
    the file is sealed; then a read-only descriptor whose bytes are the file's. A partly
    read file is not handed out; a directory is refused."""
    from p2pfs.control.client import open_local
    from p2pfs.errors import P2PFSError

    src, model = mounted
    notes = model.parent / "other" / "notes.bin"
    want = (src.parent / "other" / "notes.bin").read_bytes()
    assert open_local(notes) is None
    with open(notes, "rb") as f:
        assert f.read(1 << 20) == want[:1 << 20]
    assert open_local(notes) is None  # one chunk of four is not the file
    assert notes.read_bytes() == want
    deadline = time.monotonic() + 30
    while (fd := open_local(notes)) is None:
        assert time.monotonic() < deadline, "a file read whole never became local"
        time.sleep(0.1)
    try:
        st = os.fstat(fd)
        assert st.st_size == notes.stat().st_size
        assert os.pread(fd, st.st_size + 1, 0) == want
        with pytest.raises(OSError):
            os.write(fd, b"x")  # read-only: the loader cannot change the cached copy
    finally:
        os.close(fd)
    with pytest.raises(P2PFSError, match="not a regular file"):
        open_local(model)
