"""Units: gpuload's read planning (pure)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from gpuload._plan import Watermark, plan_aligned, plan_reads

sizes = st.lists(st.integers(0, 5000), min_size=1, max_size=5)


def covers_in_order(plan, data_sizes) -> None:
    for i, size in enumerate(data_sizes):
        pos = 0
        for s in (s for s in plan if s.file == i):
            assert s.offset == pos and s.length > 0  # back to back, in order
            pos += s.length
        assert pos == size
    assert [s.file for s in plan] == sorted(s.file for s in plan)


@settings(deadline=None)
@given(sizes, st.integers(1, 700))
def test_plan_reads_covers_every_file_in_order(data_sizes, seg):
    plan = plan_reads(data_sizes, seg)
    covers_in_order(plan, data_sizes)
    assert all(s.length <= seg for s in plan)


@settings(deadline=None)
@given(sizes, st.data())
def test_plan_aligned_ends_segments_on_file_chunk_boundaries(data_sizes, data):
    starts = [data.draw(st.integers(8, 900)) for _ in data_sizes]
    segs = [data.draw(st.integers(1, 700)) for _ in data_sizes]
    plan = plan_aligned(data_sizes, starts, segs)
    covers_in_order(plan, data_sizes)
    for s in plan:
        end = starts[s.file] + s.offset + s.length  # a file offset
        assert s.length <= segs[s.file]
        assert end % segs[s.file] == 0 or s.offset + s.length == data_sizes[s.file]


def test_plan_aligned_example():
    # data starts at file byte 100, chunks of 256: the first segment ends at file byte 256.
    assert [(s.offset, s.length) for s in plan_aligned([700], [100], [256])] == \
        [(0, 156), (156, 256), (412, 256), (668, 32)]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.randoms())
def test_watermark_is_the_longest_completed_prefix(lengths, rnd):
    offsets = [sum(lengths[:k]) for k in range(len(lengths))]
    order = list(range(len(lengths)))
    rnd.shuffle(order)
    w = Watermark()
    done = set()
    for k in order:
        w.complete(offsets[k], lengths[k])
        done.add(k)
        prefix = 0
        while prefix in done:
            prefix += 1
        assert w.done_to == (offsets[prefix - 1] + lengths[prefix - 1] if prefix else 0)
