"""From safetensors dtypes and byte ranges to torch tensors.

Every tensor we hand out is a view into a byte buffer (an mmap, one host allocation, or one
device allocation per file) unless it must not be: a tensor whose offset is not a multiple of
its element size gets its own aligned copy, because torch cannot view it (and a misaligned
pointer would be undefined behaviour for vectorised kernels anyway).
"""

from __future__ import annotations

import torch

from ._format import TensorInfo
from .errors import UnsupportedDtype

_TORCH: dict[str, torch.dtype | None] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "U16": getattr(torch, "uint16", None),
    "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": getattr(torch, "uint32", None), "F32": torch.float32,
    "I64": torch.int64, "U64": getattr(torch, "uint64", None), "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
    "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    "F4": getattr(torch, "float4_e2m1fn_x2", None),  # two values per byte
    "F6_E2M3": None, "F6_E3M2": None,                # no torch dtype exists
}


def torch_dtype(info: TensorInfo) -> torch.dtype:
    dt = _TORCH.get(info.dtype)
    if dt is None:
        raise UnsupportedDtype(f"tensor {info.name!r}: dtype {info.dtype} has no torch "
                               f"equivalent in torch {torch.__version__}")
    return dt


def torch_shape(info: TensorInfo) -> tuple[int, ...]:
    """torch's shape: F4 packs two values per byte, so its last dimension halves
    (what safetensors.torch does too)."""
    if info.dtype != "F4":
        return info.shape
    if not info.shape or info.shape[-1] % 2:
        raise UnsupportedDtype(f"tensor {info.name!r}: F4 needs an even last dimension to map "
                               f"onto torch.float4_e2m1fn_x2, shape is {list(info.shape)}")
    return (*info.shape[:-1], info.shape[-1] // 2)


def view(buf: torch.Tensor, info: TensorInfo, base: int = 0) -> torch.Tensor:
    """The tensor `info` as a view of the 1-D uint8 `buf`, whose byte `base` is the start
    of the file's data section."""
    dt = torch_dtype(info)
    shape = torch_shape(info)
    if info.nbytes == 0:
        return torch.empty(shape, dtype=dt, device=buf.device)
    raw = buf[base + info.begin: base + info.end]
    if raw.storage_offset() % dt.itemsize:
        raw = raw.clone()  # misaligned for its dtype: an aligned copy of its own
    return raw.view(dt).view(shape)


def convert(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Optional dtype conversion, applied to floating-point tensors only (ints, bools and
    packed float4 keep theirs), on whatever device `t` lives."""
    if dtype is None or t.dtype == dtype or not t.is_floating_point():
        return t
    if t.dtype is _TORCH["F4"]:
        return t  # packed pairs: torch has no elementwise conversion for it
    return t.to(dtype)
