"""gpuload's loaders on the CPU against safetensors itself: every dtype, every mode."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

import gpuload
from gpuload import _mem
from gpuload.errors import (DeviceError, HeaderError, IndexFileError, LoadIntoError, ReadError,
                            UnsupportedDtype)
from gpuload_helpers import raw_file, write

MODES = [dict(), dict(copy=True)]
TORCH_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
                "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64",
                "F64", "C64", "F4"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bytes, not values: random bits include NaNs)."""
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.device.type == "cpu" and y.device.type == "cpu"
        if x.numel():
            assert torch.equal(x.contiguous().reshape(-1).view(torch.uint8),
                               y.contiguous().reshape(-1).view(torch.uint8)), k


def all_dtypes_file(path: Path, pad_to: int = 8) -> None:
    specs = []
    for i, dt in enumerate(TORCH_DTYPES):
        specs.append((f"{dt.lower()}.w", dt, (3, 2 * (i % 5 + 1))))
        specs.append((f"{dt.lower()}.one", dt, (2,)))  # odd byte counts shift what follows
    specs += [("empty.a", "F32", (0,)), ("empty.b", "BF16", (4, 0, 2)), ("scalar", "F64", ())]
    write(path, specs, pad_to=pad_to)


@pytest.mark.parametrize("mode", MODES, ids=["mmap", "copy"])
@pytest.mark.parametrize("pad_to", [8, 1], ids=["aligned", "misaligned-header"])
def test_every_dtype_equals_safetensors(tmp_path, mode, pad_to):
    p = tmp_path / "all.safetensors"
    all_dtypes_file(p, pad_to=pad_to)
    same(gpuload.load_file(p, **mode), st_load_file(p))
    same(dict(gpuload.iter_tensors(p, **mode)), st_load_file(p))


@pytest.mark.parametrize("mode", MODES, ids=["mmap", "copy"])
def test_tiny_segments_cross_tensors(tmp_path, mode):
    """Segments smaller than tensors and not aligned to them: the staged ring (the CUDA
    path's logic) splits and joins correctly."""
    p = tmp_path / "x.safetensors"
    all_dtypes_file(p)
    ref = st_load_file(p)
    for seg in (1, 7, 4096 + 3):
        same(dict(gpuload.iter_tensors(p, segment_size=seg, slots=2, threads=3, **mode)), ref)
        same(gpuload.load_file(p, segment_size=seg, map_segment_size=seg, **mode), ref)


def test_saved_by_safetensors_and_in_file_order(tmp_path):
    p = tmp_path / "m.safetensors"
    sd = {"z": torch.randn(5, 7), "a": torch.arange(12, dtype=torch.int32).reshape(3, 4),
          "m": torch.randn(2, 3, dtype=torch.float64)}
    save_file(sd, p, metadata={"format": "pt"})
    out = gpuload.load_file(p)
    same(out, st_load_file(p))
    assert list(out) == [t.name for t in gpuload.inspect(p)[0].header.tensors]
    assert gpuload.inspect(p)[0].header.metadata == {"format": "pt"}


def test_empty_file_and_zero_size_only(tmp_path):
    p = raw_file(tmp_path / "e.safetensors", "{}      ")
    assert gpuload.load_file(p) == {} and gpuload.load_file(p, copy=True) == {}
    assert list(gpuload.iter_tensors(p)) == []
    q = tmp_path / "z.safetensors"
    write(q, [("a", "F32", (0, 5)), ("b", "I64", (0,))])
    for mode in MODES:
        same(gpuload.load_file(q, **mode), st_load_file(q))


def test_views_are_writable_and_never_touch_the_file(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1000)}, p)
    before = p.read_bytes()
    sd = gpuload.load_file(p)
    sd["w"] += 1  # copy-on-write: our process sees it, the file does not
    assert float(sd["w"].sum()) == 1000
    assert p.read_bytes() == before
    assert float(gpuload.load_file(p)["w"].sum()) == 0


def test_dtype_conversion(tmp_path):
    p = tmp_path / "c.safetensors"
    save_file({"f": torch.randn(4, 4), "i": torch.arange(3), "h": torch.randn(2).half()}, p)
    out = gpuload.load_file(p, dtype=torch.bfloat16)
    ref = st_load_file(p)
    assert out["f"].dtype == torch.bfloat16 and torch.equal(out["f"], ref["f"].bfloat16())
    assert out["i"].dtype == torch.int64 and torch.equal(out["i"], ref["i"])
    assert out["h"].dtype == torch.bfloat16


def make_sharded(tmp_path: Path, n: int = 3) -> tuple[Path, dict[str, torch.Tensor]]:
    d = tmp_path / "model"
    d.mkdir()
    full: dict[str, torch.Tensor] = {}
    wm = {}
    for i in range(n):
        sd = {f"layer{i}.w": torch.randn(64, 33), f"layer{i}.b": torch.randn(33).half()}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(sd, d / name)
        full.update(sd)
        wm.update({k: name for k in sd})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return d, full


@pytest.mark.parametrize("mode", MODES, ids=["mmap", "copy"])
def test_sharded_index(tmp_path, mode):
    d, full = make_sharded(tmp_path)
    same(gpuload.load(d, **mode), full)
    same(gpuload.load(d / "model.safetensors.index.json", **mode), full)
    names = [n for n, _ in gpuload.iter_tensors(d, **mode, segment_size=1000, window=2000)]
    assert sorted(names) == sorted(full) and names[0].startswith("layer0")


def test_sharded_without_index_and_duplicates(tmp_path):
    d, full = make_sharded(tmp_path)
    (d / "model.safetensors.index.json").unlink()
    same(gpuload.load(d), full)
    save_file({"layer0.w": torch.zeros(1)}, d / "zz.safetensors")
    with pytest.raises(IndexFileError, match="'layer0.w' is in both"):
        gpuload.load(d)


def test_index_lies(tmp_path):
    d, _ = make_sharded(tmp_path)
    idx = d / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["layer0.w"] = "model-00002-of-00003.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(IndexFileError, match="layer0.w"):
        gpuload.load(d)
    obj["weight_map"]["layer0.w"] = "../../etc/passwd"
    idx.write_text(json.dumps(obj))
    with pytest.raises(IndexFileError, match="not a file name"):
        gpuload.load(d)
    idx.write_text("{not json")
    with pytest.raises(IndexFileError):
        gpuload.inspect(d)


def test_load_file_refuses_a_directory(tmp_path):
    d, _ = make_sharded(tmp_path)
    with pytest.raises(ReadError, match="is a directory"):
        gpuload.load_file(d)
    with pytest.raises(ReadError, match="no .safetensors"):
        gpuload.load(tmp_path / "model" / ".." / ".." / tmp_path.name / "nothing_here"
                     if False else _empty_dir(tmp_path))


def _empty_dir(tmp_path: Path) -> Path:
    e = tmp_path / "empty"
    e.mkdir()
    return e


@pytest.mark.parametrize("make,needle", [
    (lambda p: raw_file(p, '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8),
     "run past the data section"),  # truncated data
    (lambda p: raw_file(p, '{"a":{"dtype":"U8","shape":[4]', b""), "not valid JSON"),  # truncated header
    (lambda p: raw_file(p, '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                           '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', b"\0" * 6),
     "overlap"),
    (lambda p: raw_file(p, "{}", length=10**6), "runs past the end"),  # lying length
    (lambda p: raw_file(p, "{}", length=2**63), "exceeds"),  # huge header size
    (lambda p: p.write_bytes(b"\x01\x02"), "shorter than"),
])
def test_malformed_files_raise_header_error(tmp_path, make, needle):
    p = tmp_path / "bad.safetensors"
    make(p)
    for fn in (gpuload.load_file, gpuload.load, gpuload.inspect,
               lambda x: gpuload.load_file(x, copy=True)):
        with pytest.raises(HeaderError, match=needle) as ei:
            fn(p)
        assert str(p) in str(ei.value)


def test_file_truncated_after_open_is_a_read_error(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(1 << 16)}, p)
    from gpuload._io import Shard

    shard = Shard.open(p)
    os.truncate(p, p.stat().st_size - 100)
    buf = memoryview(bytearray(shard.header.data_size))
    with pytest.raises(ReadError, match="truncated"):
        shard.read_into(buf, 0)
    shard.close()


def test_unsupported_and_device_errors(tmp_path):
    p = tmp_path / "f6.safetensors"
    write(p, [("x", "F6_E2M3", (4,))])
    assert gpuload.inspect(p)[0].header.tensors[0].dtype == "F6_E2M3"
    with pytest.raises(UnsupportedDtype, match="F6_E2M3"):
        gpuload.load_file(p)
    with pytest.raises(DeviceError):
        gpuload.load_file(p, device="tpu")
    with pytest.raises(ReadError, match="(?i)no such file"):
        gpuload.load_file(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="gpuload"):
        gpuload.load_file(p, thread=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists")
def test_cuda_without_gpu_is_a_device_error(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, p)
    with pytest.raises(DeviceError, match="no CUDA device"):
        gpuload.load_file(p, device="cuda:0")
    with pytest.raises(DeviceError, match="no CUDA device"):
        gpuload.iter_tensors(p, device="cuda")  # checked before the first next()


def test_multi_gb_sparse_file(tmp_path):
    """A 4.5 GiB file (offsets beyond 2**32) that is mostly a hole: markers at the ends of
    every tensor come back where they were written. Streams, so memory stays small."""
    p = tmp_path / "big.safetensors"
    big = 3 * 2**30 // 2
    specs = [("a", "BF16", (big,)), ("b", "U8", (2**30 + 5,)), ("c", "F32", (2**28 - 1,))]
    ends, entries, off = {}, {}, 0
    for name, dt, shape in specs:
        n = shape[0] * {"BF16": 2, "U8": 1, "F32": 4}[dt]
        entries[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        ends[name] = (off, off + n)
        off += n
    h = json.dumps(entries).encode()
    h += b" " * ((-(8 + len(h))) % 8)
    start = 8 + len(h)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(start + off)
        for name, (b, e) in ends.items():
            f.seek(start + b)
            f.write(b"\x11\x22\x33\x44")
            f.seek(start + e - 4)
            f.write(b"\x55\x66\x77\x88")
    assert off > 2**32
    hdr = gpuload.inspect(p)[0].header
    assert hdr.file_size == p.stat().st_size
    seen = {}
    anon0 = _mem.rss_anon()
    for name, t in gpuload.iter_tensors(p, window=64 << 20):
        b = t.reshape(-1).view(torch.uint8)
        seen[name] = (bytes(b[:4].tolist()), bytes(b[-4:].tolist()), tuple(t.shape), t.dtype)
        del t, b
    assert _mem.rss_anon() - anon0 < 64 << 20  # mapped file pages are not anonymous memory
    assert seen["a"] == (b"\x11\x22\x33\x44", b"\x55\x66\x77\x88", (big,), torch.bfloat16)
    assert seen["b"][:3] == (b"\x11\x22\x33\x44", b"\x55\x66\x77\x88", (2**30 + 5,))
    assert seen["c"][2:] == ((2**28 - 1,), torch.float32)


def test_streaming_copy_memory_is_bounded_by_the_ring(tmp_path):
    """iter_tensors(copy=True) over 512 MiB: anonymous memory (not page cache) grows by at
    most ring + window + one tensor, not by the file."""
    p = tmp_path / "m.safetensors"
    write(p, [(f"t{i}", "U8", (16 << 20,)) for i in range(32)],
          data={f"t{i}": bytes([i]) * (16 << 20) for i in range(32)})
    seg, slots, window = 4 << 20, 3, 32 << 20
    anon0 = _mem.rss_anon()
    peak = 0
    for i, (name, t) in enumerate(gpuload.iter_tensors(p, copy=True, segment_size=seg,
                                                        slots=slots, window=window)):
        assert int(t[0]) == i and int(t[-1]) == i
        peak = max(peak, _mem.rss_anon() - anon0)
        del t
    bound = slots * seg + window + (16 << 20) + (16 << 20)  # + one tensor + allocator slack
    assert peak < bound, f"anonymous memory grew by {peak >> 20} MiB (bound {bound >> 20})"


def test_load_into_module(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    p = tmp_path / "m.safetensors"
    save_file({k: v.clone() for k, v in m.state_dict().items()}, p)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for v in m.parameters():
            v.zero_()
    res = gpuload.load_into(m, p)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k])


def test_load_into_mismatches(tmp_path):
    m = torch.nn.Linear(8, 4)
    p = tmp_path / "m.safetensors"
    save_file({"weight": torch.zeros(4, 8), "extra": torch.zeros(1)}, p)
    with pytest.raises(LoadIntoError, match="missing from the checkpoint.*'bias'"):
        gpuload.load_into(m, p)
    before = m.weight.detach().clone()
    res = gpuload.load_into(m, p, strict=False)
    assert res == (["bias"], ["extra"])
    assert float(m.weight.detach().abs().sum()) == 0 and not torch.equal(before, m.weight)
    save_file({"weight": torch.zeros(8, 4), "bias": torch.zeros(4)}, p)
    with pytest.raises(LoadIntoError, match="shape"):
        gpuload.load_into(m, p)


def test_load_into_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    p = tmp_path / "t.safetensors"
    w = torch.randn(10, 4)
    save_file({"emb.weight": w}, p)
    assert gpuload.load_into(m, p) == ([], [])
    assert torch.equal(m.head.weight, w)
