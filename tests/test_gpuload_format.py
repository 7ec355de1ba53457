"""The pure safetensors header parser: strictness, error messages, and fuzzing."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuload import _format
from gpuload._format import DTYPE_BITS, MAX_HEADER_SIZE, header_length, parse, parse_header
from gpuload.errors import HeaderError
from gpuload_helpers import BITS


def blob(entries: dict, data_size: int, pad: int = 0) -> bytes:
    h = json.dumps(entries).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + b"\0" * data_size


def entry(dtype: str, shape: list, b: int, e: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


def test_dtype_table_is_the_formats():
    assert DTYPE_BITS == BITS


def test_valid_header_in_file_order():
    h = parse(blob({"b": entry("F32", [2], 4, 12), "a": entry("U8", [4], 0, 4),
                    "z": entry("BF16", [0, 3], 12, 12),
                    "__metadata__": {"format": "pt"}}, 12, pad=3))
    assert [t.name for t in h.tensors] == ["a", "b", "z"]
    assert h.metadata == {"format": "pt"}
    assert h.data_size == 12 and h.file_size == 8 + h.header_size + 12
    assert h.by_name()["b"].shape == (2,)


def test_empty_header():
    h = parse(blob({}, 0))
    assert h.tensors == () and h.data_size == 0


@pytest.mark.parametrize("dtype,shape,size", [
    ("F4", [2, 4], 4), ("F6_E2M3", [4], 3), ("F6_E3M2", [8], 6), ("C64", [2], 16),
    ("F8_E8M0", [3], 3), ("BOOL", [5], 5), ("U64", [1], 8)])
def test_every_kind_of_dtype_size(dtype, shape, size):
    assert parse(blob({"t": entry(dtype, shape, 0, size)}, size)).tensors[0].nbytes == size


@pytest.mark.parametrize("entries,data,needle,tensor", [
    ({"t": entry("F32", [2], 0, 4)}, 4, "is 8 bytes but data_offsets", "t"),
    ({"t": entry("F4", [3], 0, 2)}, 2, "not whole bytes", "t"),
    ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, 6, "overlap tensor 'a'", "b"),
    ({"a": entry("U8", [2], 2, 4)}, 4, "hole of 2 bytes", "a"),
    ({"a": entry("U8", [2], 0, 2)}, 5, "trailing bytes", None),
    ({"a": entry("U8", [8], 0, 8)}, 4, "run past the data section", "a"),
    ({"a": entry("U8", [2], 4, 2)}, 4, "end before they begin", "a"),
    ({"a": entry("X9", [2], 0, 2)}, 2, "unknown dtype", "a"),
    ({"a": entry("U8", [-2], 0, 2)}, 2, "non-negative", "a"),
    ({"a": entry("U8", [2.0], 0, 2)}, 2, "non-negative integers", "a"),
    ({"a": entry("U8", [True], 0, 1)}, 1, "non-negative integers", "a"),
    ({"a": {"dtype": "U8", "shape": [1]}}, 1, "missing 'data_offsets'", "a"),
    ({"a": entry("U8", [1], 0, 1) | {"data_offsets": [0]}}, 1, "two non-negative", "a"),
    ({"a": [1, 2]}, 0, "not an object", "a"),
    ({"a": entry("U8", [10**30, 10**30], 0, 1)}, 1, "more than twice the", "a"),
    ({"__metadata__": {"k": 1}}, 0, "__metadata__", None),
])
def test_lies_are_named(entries, data, needle, tensor):
    with pytest.raises(HeaderError) as ei:
        parse(blob(entries, data))
    assert needle in str(ei.value)
    assert ei.value.tensor == tensor
    if tensor is not None:
        assert repr(tensor) in str(ei.value)


def test_duplicate_names_rejected():
    h = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    with pytest.raises(HeaderError, match="'a' appears twice"):
        parse(struct.pack("<Q", len(h)) + h + b"\0\0")


@pytest.mark.parametrize("raw,needle", [
    (b"", "shorter than the 8-byte"),
    (b"\x01\x00", "shorter than the 8-byte"),
    (struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}", "exceeds"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    (struct.pack("<Q", 0), "too small"),
    (struct.pack("<Q", 2) + b"[]", "does not start with '{'"),
    (struct.pack("<Q", 4) + b'{"a"', "not valid JSON"),
    (struct.pack("<Q", 3) + b"{\xff}", "not UTF-8"),
    (struct.pack("<Q", 2002) + b"{" + b'"a":[' * 400 + b"0" + b"]" * 400 + b"}", "not valid JSON"),
])
def test_malformed_prefix_and_json(raw, needle):
    with pytest.raises(HeaderError, match=needle):
        parse(raw)


def test_deep_nesting_does_not_crash():
    deep = b"{" + b'"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(HeaderError):
        parse(struct.pack("<Q", len(deep)) + deep)


def test_header_length_checks_file_size():
    assert header_length(struct.pack("<Q", 10), 18) == 10
    with pytest.raises(HeaderError):
        header_length(struct.pack("<Q", 11), 18)


def test_path_added_to_error():
    err = HeaderError("bad", tensor="w").with_path("/m/x.safetensors")
    assert str(err) == "/m/x.safetensors: invalid safetensors header: tensor 'w': bad"


# -- fuzzing ------------------------------------------------------------------------------
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2**70))
def test_fuzz_raw_bytes(data, claimed_size):
    """Any bytes, any claimed file size: a Header or a HeaderError, nothing else."""
    try:
        h = parse(data, file_size=claimed_size % (2**64) if data else None)
    except HeaderError:
        return
    assert h.file_size <= max(len(data), claimed_size % (2**64))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)), max_leaves=12)
shapes = st.lists(st.one_of(st.integers(0, 9), st.integers(-3, 2**66), json_scalars), max_size=4)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), json_scalars),
    "shape": st.one_of(shapes, json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-2, 200), min_size=0, max_size=3), json_values),
    "extra": json_values})


@FUZZ
@given(st.dictionaries(st.text(max_size=6), st.one_of(entries, json_values), max_size=6),
       st.integers(0, 300))
def test_fuzz_structured_headers(header, data_size):
    """Near-valid headers (right keys, wrong values): parse or HeaderError; and whatever
    parses satisfies the format's invariants."""
    raw = json.dumps(header, allow_nan=True).encode()
    try:
        h = parse_header(raw, data_size=data_size)
    except HeaderError:
        return
    pos = 0
    for t in h.tensors:
        assert t.begin == pos and t.end >= t.begin
        assert _format._bits(list(t.shape), DTYPE_BITS[t.dtype], limit=2**80) == 8 * t.nbytes
        pos = t.end
    assert pos == data_size


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(DTYPE_BITS)),
                          st.lists(st.integers(0, 6), max_size=3)), max_size=6),
       st.data())
def test_fuzz_valid_layouts_roundtrip(specs, data):
    """Random valid layouts always parse, and mutating one offset by a byte never does."""
    entries_, off = {}, 0
    for i, (dtype, shape) in enumerate(specs):
        n = 1
        for d in shape:
            n *= d
        bits = n * DTYPE_BITS[dtype]
        if bits % 8:
            shape = shape + [8]
            bits *= 8
        entries_[f"t{i}"] = entry(dtype, shape, off, off + bits // 8)
        off += bits // 8
    h = parse_header(json.dumps(entries_).encode(), data_size=off)
    assert len(h.tensors) == len(specs) and h.data_size == off
    nonempty = [k for k, v in entries_.items() if v["data_offsets"][1] > v["data_offsets"][0]]
    if nonempty:
        k = data.draw(st.sampled_from(nonempty))
        which = data.draw(st.sampled_from([0, 1]))
        entries_[k]["data_offsets"][which] += data.draw(st.sampled_from([-1, 1]))
        with pytest.raises(HeaderError):
            parse_header(json.dumps(entries_).encode(), data_size=off)
