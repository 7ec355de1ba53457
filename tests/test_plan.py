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


def test_coalesce_reads_through_gaps_up_to_max_gap():
    e = entry_for(bytes(100), 10)  # chunks at 0, 10, ..., 90
    locs = [ChunkLoc("k", c) for c in e.chunks]
    picked = [locs[0], locs[2], locs[5], ChunkLoc("other", locs[6].ref), locs[7]]
    # 10 bytes between chunks 0 and 2: one GET through them with max_gap 10, not with 9.
    assert [(r.key, r.offset, r.length, len(r.locs)) for r in coalesce(picked, 100, 10)] == [
        ("k", 0, 30, 2), ("k", 50, 10, 1), ("other", 60, 10, 1), ("k", 70, 10, 1)]
    assert [(r.offset, r.length) for r in coalesce(picked[:2], 100, 9)] == [(0, 10), (20, 10)]
    # The limit counts the gap: 0..30 is 30 bytes.
    assert [(r.offset, r.length) for r in coalesce(picked[:2], 29, 10)] == [(0, 10), (20, 10)]
    # Out of order (or the same chunk twice) never merges backwards.
    assert len(coalesce([locs[2], locs[0]], 100, 50)) == 2
    assert len(coalesce([locs[2], locs[2]], 100, 50)) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 19), min_size=1, max_size=20), st.integers(0, 40),
       st.integers(10, 120))
def test_gapped_requests_hold_their_chunks_and_respect_the_bounds(picks, gap, limit):
    e = entry_for(bytes(200), 10)
    locs = [ChunkLoc("k", e.chunks[i]) for i in sorted(set(picks))]
    reqs = coalesce(locs, limit, gap)
    assert [l for req in reqs for l in req.locs] == locs
    for req in reqs:
        first, last = req.locs[0].ref, req.locs[-1].ref
        assert req.offset == first.offset and req.length == last.offset + last.length - first.offset
        assert len(req.locs) == 1 or req.length <= limit
        for a, b in zip(req.locs, req.locs[1:]):
            assert 0 <= b.ref.offset - (a.ref.offset + a.ref.length) <= gap


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
