"""gpuload's fill path on a model with more shards than the daemon takes control
connections: sessions are held only while a file is being filled (before, each shard held
a session from the start, and past `control_max_connections` the whole load fell back to
reading through FUSE); a segment that finds the daemon at its limit is read through the
mount into the same memory, so the load is correct either way."""

from __future__ import annotations

import json
import uuid

import torch

import gpuload
from conftest import needs_fuse, p2pfs_cmd
from gpuload_helpers import write

pytestmark = needs_fuse


def test_more_shards_than_control_connections_are_all_filled(seaweed, tmp_path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    raw: dict[str, bytes] = {}
    n = 10
    for i in range(n):
        raw.update(write(src / f"model-{i:05d}-of-{n:05d}.safetensors",
                         [(f"s{i}.w{j}", "F32", (64, 300 + j)) for j in range(3)], seed=i))
    url = f"s3://models/shards-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", str(src), url, endpoint=seaweed.endpoint)
    cfg = tmp_path / "p2pfs.toml"
    cfg.write_text("[mount]\ncontrol_max_connections = 3\n")
    m = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    sd = gpuload.load(m.path, device="cpu")
    assert sorted(sd) == sorted(raw)
    for name, t in sd.items():
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw[name], name
    status = json.loads(p2pfs_cmd("status", str(m.path), "--json").stdout)
    total = sum(p.stat().st_size for p in src.iterdir())
    # Before, open_clients failed on the 4th shard and the whole load read through FUSE
    # (fill_bytes 0). Now files take sessions as they are filled; segments of files past
    # the limit at that moment are read through the mount into the same memory.
    assert 0 < status["fill_bytes"] <= total, status["fill_bytes"]
