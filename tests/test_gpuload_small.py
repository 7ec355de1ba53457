"""Small files (issue 10, item 4): a warm local load populates in the caller's thread, a cold
one keeps its readers; views come from one whole-map view per dtype. Real files, real maps."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file

import gpuload
from gpuload import _api, _io
from gpuload._cpu import MapSink
from gpuload._index import Checkpoint
from gpuload._pipeline import Pipeline
from gpuload._plan import Segment, plan_reads
from gpuload_helpers import write
from test_gpuload_load import all_dtypes_file, same


def evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (no root needed); skip where the
    filesystem keeps them (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            if _io.looks_cached(mm, min(size, 4096)):
                pytest.skip(f"{path.parent}: this filesystem keeps its pages in memory (tmpfs?)")
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def bert_like(path: Path) -> None:
    """Many tensors, most of them tiny (LayerNorm and bias vectors), a few matrices."""
    specs: list[tuple[str, str, tuple[int, ...]]] = [("emb", "F32", (300, 64))]
    for i in range(24):
        specs += [(f"l{i}.w", "F32", (64, 64)), (f"l{i}.b", "F32", (64,)),
                  (f"l{i}.ln.w", "F16", (64,)), (f"l{i}.ln.b", "BF16", (64,)),
                  (f"l{i}.odd", "I8", (3,))]  # odd sizes misalign what follows
    write(path, specs)


class Recorder:
    """A sink that remembers which thread processed which segment, and can fail."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, Segment]] = []
        self.fail_at = fail_at

    def process(self, seg: Segment) -> None:
        if self.fail_at is not None and seg.offset == self.fail_at:
            raise OSError("injected")
        self.calls.append((threading.current_thread().name, seg))

    def flush(self) -> None:
        pass


def test_inline_pipeline_runs_in_the_callers_thread_and_only_as_far_as_asked():
    plan = plan_reads([100, 50], 30)
    sink = Recorder()
    p = Pipeline(plan, sink, threads=4, sizes=[100, 50], inline=True).start()
    assert p._threads == [] and sink.calls == []  # nothing runs before it is asked for
    p.wait_until(0, 31)  # needs segments [0, 30) and [30, 60)
    assert [s for _, s in sink.calls] == plan[:2]
    p.wait_until(0, 10)  # already there: nothing more
    assert len(sink.calls) == 2
    p.join()
    assert [s for _, s in sink.calls] == plan
    assert {name for name, _ in sink.calls} == {threading.current_thread().name}
    p.close()


def test_inline_pipeline_error_is_raised_and_raised_again():
    plan = plan_reads([100], 30)
    p = Pipeline(plan, Recorder(fail_at=30), threads=4, sizes=[100], inline=True).start()
    p.wait_until(0, 30)
    with pytest.raises(OSError, match="injected"):
        p.wait_until(0, 100)
    with pytest.raises(OSError, match="injected"):  # not skipped over on the next call
        p.join()


def test_inline_pipeline_refuses_to_claim_more_than_its_plan():
    p = Pipeline(plan_reads([100], 30), Recorder(), threads=1, sizes=[100], inline=True)
    with pytest.raises(RuntimeError, match="ended before its plan"):
        p.wait_until(0, 101)


def test_looks_cached_follows_the_page_cache(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(8 << 20))
    shard_fd = os.open(p, os.O_RDONLY)
    try:
        mm = mmap.mmap(shard_fd, 8 << 20, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        evict(p)
        assert not _io.looks_cached(mm, 8 << 20)
        os.pread(shard_fd, 4096, (8 << 20) - 4096)  # only the last page: still cold
        assert not _io.looks_cached(mm, 8 << 20)
        warm(p)
        assert _io.looks_cached(mm, 8 << 20)
        assert _io.looks_cached(mm, 0)
        mm.close()
    finally:
        os.close(shard_fd)


def session(path: Path, **tuning) -> _api._Session:
    return _api._Session(Checkpoint((path,), None), torch.device("cpu"), copy=False,
                         streaming=False, tuning=_api.Tuning(**tuning))


def test_warm_small_file_loads_without_reader_threads(tmp_path):
    p = tmp_path / "m.safetensors"
    bert_like(p)
    warm(p)
    with session(p) as s:
        assert s.pipeline.inline and s.pipeline._threads == []
        same(s.all(None), st_load_file(p))
    data_size = _io.read_header(p)[0].data_size
    with session(p, inline_below=data_size + 1) as s:  # just under the threshold
        assert s.pipeline.inline
    with session(p, inline_below=data_size) as s:  # at the threshold: readers
        assert not s.pipeline.inline and s.pipeline._threads
        same(s.all(None), st_load_file(p))


def test_cold_small_file_keeps_its_readers(tmp_path):
    """Cold, one thread populating a file in order was slower here (large folios behind a
    single read-ahead stream made the first touch of every page slow on this VM)."""
    p = tmp_path / "m.safetensors"
    bert_like(p)
    evict(p)
    with session(p) as s:
        assert not s.pipeline.inline and s.pipeline._threads
        same(s.all(None), st_load_file(p))


@pytest.mark.parametrize("pad_to", [8, 1], ids=["aligned", "misaligned-header"])
@pytest.mark.parametrize("inline_below", [0, 1 << 40], ids=["threads", "inline"])
def test_both_paths_equal_safetensors(tmp_path, pad_to, inline_below):
    p = tmp_path / "all.safetensors"
    all_dtypes_file(p, pad_to=pad_to)
    warm(p)
    ref = st_load_file(p)
    same(gpuload.load_file(p, inline_below=inline_below), ref)
    same(dict(gpuload.iter_tensors(p, inline_below=inline_below, map_segment_size=4096)), ref)
    q = tmp_path / "bert.safetensors"
    bert_like(q)
    same(gpuload.load_file(q, inline_below=inline_below, map_segment_size=4096), st_load_file(q))


def test_map_views_share_the_map(tmp_path):
    """Views, not copies: every aligned tensor points into the file's one map, at its own
    offset; a misaligned one gets its own aligned copy (as before)."""
    p = tmp_path / "m.safetensors"
    bert_like(p)
    shard = _io.Shard.open(p)
    try:
        sink = MapSink([shard])
        base = sink.buffer(0).data_ptr()
        for info in shard.header.tensors:
            t = sink.tensor(0, info)
            start = shard.header.data_start + info.begin
            if start % t.element_size():
                assert t.data_ptr() % t.element_size() == 0
                assert not base <= t.data_ptr() < base + shard.size
            else:
                assert t.data_ptr() == base + start, info.name
            assert t.untyped_storage().nbytes() >= info.nbytes
    finally:
        shard.close()
