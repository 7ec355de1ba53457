"""The safetensors format, as a pure parser over bytes: no files, no torch.

A safetensors file is

    [8 bytes: N, little-endian u64][N bytes: JSON header][data section]

The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data section) plus an optional "__metadata__" of str -> str. We accept exactly
what the format specifies (https://github.com/huggingface/safetensors, "Format") and what
`safetensors` itself accepts, checked strictly:

- N is at most 100 MB (safetensors' own limit) and the header fits in the file;
- the JSON is UTF-8, an object, starts with "{", has no duplicate names (JSON would silently
  keep the last one: two tensors with one name is a lie about the file);
- every dtype is one the format defines; shapes are lists of non-negative ints; offsets are
  two ints with begin <= end; (product of shape) x (bits of dtype) is whole bytes and equals
  end - begin;
- sorted by offset, the tensors cover the data section exactly: no overlap, no hole, nothing
  after the last one (the format forbids holes so that files cannot be polyglots).

Unknown keys inside a tensor entry are ignored, as safetensors does. Every error is a
HeaderError naming the tensor. Work is bounded by the header's length: shape products stop
growing once they exceed the data section, so no input makes us allocate without bound.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import HeaderError

PREFIX = 8
MAX_HEADER_SIZE = 100_000_000

# Bits per element of every dtype the format defines (safetensors 0.8 `Dtype`).
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    header_size: int                      # N, the JSON's length
    tensors: tuple[TensorInfo, ...]       # in file order (by offset, then name)
    metadata: Mapping[str, str] | None

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data section."""
        return PREFIX + self.header_size

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def header_length(prefix: bytes, file_size: int) -> int:
    """N from the first 8 bytes, checked against the file's size."""
    if len(prefix) < PREFIX or file_size < PREFIX:
        raise HeaderError(f"file is {file_size} bytes, shorter than the 8-byte length prefix")
    (n,) = struct.unpack("<Q", prefix[:PREFIX])
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if n < 2:
        raise HeaderError(f"header length {n} is too small for a JSON object")
    if PREFIX + n > file_size:
        raise HeaderError(f"header length {n} runs past the end of the file ({file_size} bytes)")
    return n


def parse_header(raw: bytes, *, data_size: int) -> Header:
    """Parse and validate the N header bytes of a file whose data section is `data_size` bytes."""
    if data_size < 0:
        raise HeaderError("data section has negative size")
    if not raw.startswith(b"{"):
        raise HeaderError("header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise HeaderError(f"{dup.name!r} appears twice in one object") from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"header is not valid JSON ({_short(exc)})") from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object")

    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise HeaderError("__metadata__ must be an object of strings")

    tensors = [_tensor(name, entry, data_size) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    pos = 0
    prev: TensorInfo | None = None
    for t in tensors:
        if t.begin < pos:
            assert prev is not None
            raise HeaderError(f"data_offsets [{t.begin}, {t.end}] overlap tensor {prev.name!r} "
                              f"[{prev.begin}, {prev.end}]", tensor=t.name)
        if t.begin > pos:
            raise HeaderError(f"leaves a hole of {t.begin - pos} bytes before it "
                              f"(data_offsets [{t.begin}, {t.end}], previous data ends at {pos})",
                              tensor=t.name)
        pos = t.end
        prev = t
    if pos != data_size:
        raise HeaderError(f"tensors cover {pos} bytes but the data section is {data_size} bytes"
                          + (" (trailing bytes after the last tensor)" if pos < data_size else ""))
    return Header(header_size=len(raw), tensors=tuple(tensors), metadata=metadata)


def parse(blob: bytes, file_size: int | None = None) -> Header:
    """Parse the header at the start of `blob` (at least 8 + N bytes of the file)."""
    size = len(blob) if file_size is None else file_size
    n = header_length(blob[:PREFIX], size)
    if len(blob) < PREFIX + n:
        raise HeaderError(f"only {len(blob)} bytes given, the header needs {PREFIX + n}")
    return parse_header(blob[PREFIX:PREFIX + n], data_size=size - PREFIX - n)


def _tensor(name: str, entry: Any, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError("entry is not an object", tensor=name)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise HeaderError(f"missing {key!r}", tensor=name)
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"unknown dtype {_short(dtype)}", tensor=name)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"shape must be a list of non-negative integers, not {_short(shape)}",
                          tensor=name)
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise HeaderError(f"data_offsets must be two non-negative integers, not {_short(offsets)}",
                          tensor=name)
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"data_offsets [{begin}, {end}] end before they begin", tensor=name)
    if end > data_size:
        raise HeaderError(f"data_offsets [{begin}, {end}] run past the data section "
                          f"({data_size} bytes)", tensor=name)
    # The limit only has to exceed what could match (8 x data_size bits); twice that keeps
    # the "is N bytes" message exact for near misses.
    bits = _bits(shape, DTYPE_BITS[dtype], limit=16 * data_size + 1024)
    if bits is None or bits != 8 * (end - begin):
        want = f"more than twice the {data_size}-byte data section" if bits is None else (
            f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits (not whole bytes)")
        raise HeaderError(f"shape {shape} x {dtype} is {want} but data_offsets "
                          f"[{begin}, {end}] hold {end - begin} bytes", tensor=name)
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _bits(shape: list[int], bits: int, *, limit: int) -> int | None:
    """shape's element count x bits, or None once it exceeds `limit` (keeps big-int work
    bounded: a header can list a thousand dims of 10**18)."""
    if 0 in shape:
        return 0
    total = bits
    for d in shape:
        total *= d
        if total > limit:
            return None
    return total


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Duplicate(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _short(x: Any, n: int = 60) -> str:
    s = repr(x) if not isinstance(x, BaseException) else str(x)
    return s if len(s) <= n else s[:n] + "..."
