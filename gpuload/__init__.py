"""gpuload: stream safetensors into GPU and CPU memory.

    sd = gpuload.load_file("model.safetensors", device="cuda:0")    # dict[str, Tensor]
    sd = gpuload.load("/models/llama", device="cuda:0")             # all shards of a checkpoint
    for name, t in gpuload.iter_tensors(path, device="cuda:0"): ... # streaming, bounded memory
    gpuload.load_into(model, "/models/llama", strict=True)          # into an nn.Module
    gpuload.inspect(path)                                           # validated headers
    gpuload.warm(path)                                              # make a p2pfs file local

On the CPU, tensors are by default views of a private (copy-on-write) memory map of the file,
made resident before the call returns: no copy, writable, and the fastest load measured here
(see docs/GPULOAD.md). `copy=True` returns tensors in memory the caller owns outright.

Keyword tuning (all loaders): threads, segment_size, map_segment_size, slots, window,
prefetch (see `gpuload._api.Tuning` for what each means and its default). Errors: see
`gpuload.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import torch

from . import _api, _p2pfs, _tensors
from ._api import ShardInfo, Tuning
from ._format import Header, TensorInfo
from .errors import (DeviceError, GpuloadError, HeaderError, IndexFileError, LoadIntoError,
                     PrefetchError, ReadError, UnsupportedDtype)

__all__ = [
    "load_file", "load", "iter_tensors", "load_into", "inspect", "warm",
    "LoadResult", "ShardInfo", "Header", "TensorInfo", "Tuning",
    "GpuloadError", "HeaderError", "IndexFileError", "ReadError", "UnsupportedDtype",
    "DeviceError", "LoadIntoError", "PrefetchError",
]

PathLike = str | os.PathLike[str]


def load_file(path: PathLike, device: str | int | torch.device = "cpu", *, copy: bool = False,
              dtype: torch.dtype | None = None, **tuning: Any) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file on `device`, in file order.

    device="cpu", copy=False: views of a private memory map, resident on return.
    copy=True: one allocation per file that the caller owns. On CUDA: one device allocation
    per file, tensors are views into it. `dtype`: convert floating-point tensors on the device.
    """
    return _api.load_checkpoint(path, device, single_file=True, copy=copy, dtype=dtype,
                                tuning=tuning)


def load(path: PathLike, device: str | int | torch.device = "cpu", *, copy: bool = False,
         dtype: torch.dtype | None = None, **tuning: Any) -> dict[str, torch.Tensor]:
    """A whole checkpoint: a .safetensors file, a model.safetensors.index.json, or a
    directory holding either. Shards load one after another in one pipeline."""
    return _api.load_checkpoint(path, device, single_file=False, copy=copy, dtype=dtype,
                                tuning=tuning)


def iter_tensors(path: PathLike, device: str | int | torch.device = "cpu", *,
                 copy: bool = False, dtype: torch.dtype | None = None,
                 **tuning: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, each as soon as its bytes are in place. Readers run at
    most `window` bytes ahead of the consumer; host memory stays bounded by the staging
    ring (and, with copy=True on the CPU, the tensors the consumer still holds). Checks the
    device and the checkpoint's layout before returning."""
    return _api.iter_checkpoint(path, device, copy=copy, dtype=dtype, tuning=tuning)


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def load_into(module: torch.nn.Module, path: PathLike, *, strict: bool = True,
              device: str | int | torch.device | None = None, **tuning: Any) -> LoadResult:
    """Copy a checkpoint into `module`'s parameters and persistent buffers, streaming
    (memory: one staging ring, not a second copy of the model). With strict=True, names or
    shapes that do not match raise LoadIntoError before anything is written. Tied
    parameters count as loaded when any of their names is in the checkpoint."""
    targets = module.state_dict(keep_vars=True)
    headers = inspect(path)
    file_tensors = {t.name: t for info in headers for t in info.header.tensors}
    unexpected = [n for n in file_tensors if n not in targets]
    present = {id(targets[n]) for n in file_tensors if n in targets}
    missing = [n for n, t in targets.items() if id(t) not in present]
    if strict and (missing or unexpected):
        raise LoadIntoError(_mismatch(missing, unexpected))
    for name, info in file_tensors.items():
        if name in targets:
            want = tuple(targets[name].shape)
            got = _tensors.torch_shape(info)
            if want != got:
                raise LoadIntoError(f"tensor {name!r}: checkpoint shape {list(got)} but the "
                                    f"module has {list(want)}")
    if device is None:
        first = next(iter(targets.values()), None)
        device = first.device if first is not None else "cpu"
    with torch.no_grad():
        for name, t in iter_tensors(path, device=device, **tuning):
            dst = targets.get(name)
            if dst is not None:
                dst.copy_(t)
    return LoadResult(missing, unexpected)


def _mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the module (e.g. {unexpected[:3]})")
    return "checkpoint does not match the module: " + "; ".join(parts)


def inspect(path: PathLike) -> list[ShardInfo]:
    """Validated headers of every shard (and the index, if any); reads no tensor data."""
    return _api.inspect(path)


def warm(path: PathLike, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Make a file or directory on a p2pfs mount local; returns when it is (the daemon's
    summary: done, total, seconds). PrefetchError if the path is not on p2pfs."""
    return _p2pfs.warm(path, progress=progress)
