"""Pure units: read planning, coalescing and reply assembly."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings, strategies as st

from p2pfs.manifest import ChunkRef, Entry, with_starts
from p2pfs.plan import ChunkLoc, chunk_span, coalesce, overlaps, slice_reply


def entry_for(data: bytes, chunk: int) -> Entry:
    refs = tuple(ChunkRef(0, i, len(data[i:i + chunk]), len(data[i:i + chunk]), "none",
                          hashlib.sha256(data[i:i + chunk]).hexdigest())
                 for i in range(0, len(data), chunk))
    return with_starts(Entry(path="f", type="file", size=len(data), chunks=refs))


def test_span_clips_to_eof_and_empty_ranges():
    e = entry_for(bytes(100), 30)  # chunks at 0, 30, 60, 90
    assert list(chunk_span(e, 0, 1)) == [0]
    assert list(chunk_span(e, 29, 2)) == [0, 1]
    assert list(chunk_span(e, 90, 1000)) == [3]
    assert list(chunk_span(e, 100, 10)) == []
    assert list(chunk_span(e, 5, 0)) == []


def test_coalesce_merges_adjacent_up_to_the_limit():
    e = entry_for(bytes(100), 10)
    locs = [ChunkLoc("k", c) for c in e.chunks]
    reqs = coalesce(locs, 30)
    assert [(r.offset, r.length, len(r.locs)) for r in reqs] == [
        (0, 30, 3), (30, 30, 3), (60, 30, 3), (90, 10, 1)]
    # A gap or another key starts a new request.
    reqs = coalesce([locs[0], locs[2], ChunkLoc("other", locs[3].ref), locs[4]], 100)
    assert [(r.key, r.offset, r.length) for r in reqs] == [
        ("k", 0, 10), ("k", 20, 10), ("other", 30, 10), ("k", 40, 10)]
    # A chunk bigger than the limit still gets its own request.
    assert [r.length for r in coalesce(locs[:2], 5)] == [10, 10]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.integers(1, 300), st.data())
def test_reads_assembled_from_chunks_equal_the_source(data, chunk, draw):
    e = entry_for(data, chunk)
    off = draw.draw(st.integers(0, len(data) + 10))
    size = draw.draw(st.integers(0, len(data) + 10))
    span = chunk_span(e, off, size)
    chunks = [data[e.starts[i]:e.starts[i] + e.chunks[i].size] for i in span]
    got = bytes(slice_reply(e, span, chunks, off, size)) if span else b""
    assert got == data[off:off + size]
    # One coalesced request covers exactly its chunks, back to back, in order.
    locs = [ChunkLoc("k", e.chunks[i]) for i in span]
    reqs = coalesce(locs, 1 << 30)
    assert [l for req in reqs for l in req.locs] == locs
    for req in reqs:
        assert req.offset == req.locs[0].ref.offset
        assert req.length == sum(l.ref.length for l in req.locs)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 64), st.integers(0, 320), st.integers(0, 400))
def test_overlaps_add_up_to_the_reply(size, chunk, offset, length):
    """What each chunk contributes to a reply, summed, is the reply's length."""
    data = bytes(range(256)) * 2
    e = entry_for(data[:size], chunk)
    span = chunk_span(e, offset, length)
    parts = overlaps(e, span, offset, length)
    assert all(0 < p <= chunk for p in parts)
    assert sum(parts) == max(0, min(offset + length, size) - offset) if span else parts == []
