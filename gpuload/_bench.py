"""Side-by-side timing of gpuload and the loaders it is measured against.

Every method is timed until every byte of every tensor has been touched (one byte per
4 KiB page is summed; on CUDA the sum runs on the device and is synchronised), not until
lazy views exist: a loader that returns mmap views would otherwise look free. Methods run
in the same order each round (this VM's fresh-memory cost depends on what ran before), and
the results of one method are dropped before the next starts (outside the timing).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

Loader = Callable[[str, str], Iterable[torch.Tensor]]


def touch(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every page of every tensor; returns the sum (so nothing is skipped)."""
    total = 0
    pending = []
    for t in tensors:
        if t.numel() == 0:
            continue
        b = t.detach().reshape(-1).view(torch.uint8)[::4096]
        if b.is_cuda:
            pending.append(b.sum(dtype=torch.int64))
        else:
            total += int(b.sum(dtype=torch.int64))
    if pending:
        total += int(torch.stack(pending).sum())  # one sync at the end
    return total


def _gpuload(path: str, device: str) -> Iterable[torch.Tensor]:
    import gpuload

    return gpuload.load(path, device=device).values()


def _gpuload_copy(path: str, device: str) -> Iterable[torch.Tensor]:
    import gpuload

    return gpuload.load(path, device=device, copy=True).values()


def _safetensors(path: str, device: str) -> Iterable[torch.Tensor]:
    from safetensors.torch import load_file

    out: list[torch.Tensor] = []
    for p in _files(path):
        out.extend(load_file(p, device=device).values())
    return out


def _fastsafetensors(path: str, device: str) -> Iterable[torch.Tensor]:
    from fastsafetensors import fastsafe_open

    with fastsafe_open(filenames=_files(path), nogds=True, device=device) as f:
        return [f.get_tensor(k) for k in f.keys()]


def _runai(path: str, device: str) -> Iterable[torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    out = []
    with SafetensorsStreamer() as s:
        s.stream_files(_files(path), device="cpu")
        for _, t in s.get_tensors():
            out.append(t if device == "cpu" else t.to(device, non_blocking=True))
    return out


def _files(path: str) -> list[str]:
    from ._index import resolve

    return [str(p) for p in resolve(path).shards]


METHODS: dict[str, tuple[str | None, Loader]] = {
    # name: (module that must import, loader)
    "gpuload": (None, _gpuload),
    "gpuload(copy)": (None, _gpuload_copy),
    "safetensors": ("safetensors", _safetensors),
    "fastsafetensors": ("fastsafetensors", _fastsafetensors),
    "runai-model-streamer": ("runai_model_streamer", _runai),
}


def available() -> tuple[list[str], dict[str, str]]:
    """(methods that can run here, {method: why not} for the others)."""
    ok, missing = [], {}
    for name, (mod, _) in METHODS.items():
        if mod is None:
            ok.append(name)
            continue
        try:
            __import__(mod)
            ok.append(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            missing[name] = f"{type(exc).__name__}: {exc}"
    return ok, missing


def drop_caches() -> None:
    """Empty the page cache (root only): the next read comes from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def time_once(name: str, path: str, device: str) -> tuple[float, int]:
    loader = METHODS[name][1]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tensors = list(loader(path, device))
    check = touch(tensors)
    seconds = time.perf_counter() - t0
    del tensors
    gc.collect()
    return seconds, check


def run(path: str, device: str, methods: list[str], *, rounds: int, cold: bool,
        settle: float = 0.0, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time `methods` for `rounds` rounds (same order each round). cold: drop the page cache
    before every measurement, then wait `settle` seconds (the VM returns freed memory to its
    host a little after a drop; waiting makes every method see the same state)."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    checks: dict[str, int] = {}
    if not cold:
        for m in methods:  # fill the page cache and let each method warm up once
            time_once(m, path, device)
    for r in range(rounds):
        for m in methods:
            if cold:
                drop_caches()
                time.sleep(settle)
            s, check = time_once(m, path, device)
            times[m].append(s)
            checks[m] = check
            log(f"round {r + 1} {'cold' if cold else 'warm'} {m}: {s:.3f}s")
    if len(set(checks.values())) > 1:
        raise RuntimeError(f"loaders disagree on the bytes: {checks}")
    return {m: {"median_s": statistics.median(v), "runs_s": [round(x, 4) for x in v]}
            for m, v in times.items()}
