"""The loader: resolve a checkpoint, open its shards, run one pipeline over all of them.

A `_Session` owns everything one load uses: the open shards, the sink (where bytes go), the
pipeline's reader threads, the p2pfs prefetch thread and the staging ring. `with` closes all
of it; no thread or ring outlives the load (rings go back to their pool for the next one).

Which sink:
    device     copy    streaming   sink        host memory
    cpu        False   any         MapSink     none of ours (views of a private mmap)
    cpu        True    False       DirectSink  one allocation per file (the result itself)
    cpu        True    True        StagedSink  ring + tensors the consumer holds
    cuda       -       any         CudaSink    pinned ring (slots x segment_size)

On CPU, when every shard lies on a p2pfs mount whose daemon speaks `fill`, FillSink takes
the place of MapSink and DirectSink: the daemon writes each file into a memfd of ours
(one allocation per file, no FUSE in the data path; see _fill.py). Otherwise, or with
`fill=False`, the sinks above read through the mount while a prefetch hint runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _tensors
from ._cpu import HOST_RINGS, DirectSink, MapSink, StagedSink
from ._fill import FillSink, open_clients
from ._format import Header
from ._index import Checkpoint, check_shards, resolve
from ._io import Shard
from ._p2pfs import Prefetcher, mount_of, open_local
from ._pipeline import Pipeline, Ring
from ._plan import plan_aligned, plan_reads
from .errors import DeviceError, IndexFileError, ReadError

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Tuning:
    """How a load runs. Defaults measured on a 2-core VM with a virtio disk and on p2pfs;
    all of them are keyword arguments of the public functions."""

    threads: int = 4                  # reader threads (requests in flight)
    segment_size: int = 16 * MiB      # pread size = staging slot size (staged/direct/CUDA)
    map_segment_size: int = 32 * MiB  # populate granularity for the mmap path
    inline_below: int = 512 * MiB     # mmap path, local, page cache warm: below it, no threads
    slots: int = 6                    # staging ring slots (>= threads, so readers never idle)
    window: int = 256 * MiB           # streaming: how far readers may run ahead of the consumer
    prefetch: bool = True             # ask p2pfs to fetch files in load order
    local: bool = True                # on p2pfs: read the daemon's local copy when it is whole
    fill: bool = True                 # on p2pfs, CPU: have the daemon write into our memory
    fill_inflight: int = 16           # fill requests in flight (one chunk each)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    file_size: int
    header: Header


def parse_device(device: str | int | torch.device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"not a device: {device!r} ({exc})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device}: no CUDA device (torch {torch.__version__}, "
                              f"cuda {torch.version.cuda})")
        idx = torch.cuda.current_device() if d.index is None else d.index
        if idx >= torch.cuda.device_count():
            raise DeviceError(f"{device}: only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", idx)
    if d.type != "cpu":
        raise DeviceError(f"{device}: gpuload loads to 'cpu' or 'cuda[:N]'")
    return d


def inspect(path: str | os.PathLike[str]) -> list[ShardInfo]:
    """Headers of every shard of a checkpoint, validated (and against its index)."""
    ckpt = resolve(path)
    infos = []
    for p in ckpt.shards:
        shard = Shard.open(p)
        shard.close()
        infos.append(ShardInfo(p, shard.size, shard.header))
    _check(ckpt, [i.header for i in infos], [i.path for i in infos])
    return infos


def _check(ckpt: Checkpoint, headers: list[Header], paths: list[Path]) -> None:
    if ckpt.weight_map is not None:
        check_shards(ckpt.weight_map, {p.name: [t.name for t in h.tensors]
                                       for p, h in zip(paths, headers)})
        return
    seen: dict[str, Path] = {}
    for p, h in zip(paths, headers):
        for t in h.tensors:
            if t.name in seen:
                raise IndexFileError(f"tensor {t.name!r} is in both {seen[t.name]} and {p}")
            seen[t.name] = p


class _Session:
    def __init__(self, ckpt: Checkpoint, device: torch.device, *, copy: bool,
                 streaming: bool, tuning: Tuning) -> None:
        self.ckpt = ckpt
        self.device = device
        self.copy = copy
        self.streaming = streaming
        self.tuning = tuning
        self.shards: list[Shard] = []
        self._release: list[Any] = []

    def __enter__(self) -> "_Session":
        try:
            self._open()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _open(self) -> None:
        t = self.tuning
        paths = list(self.ckpt.shards)
        on_p2pfs = [p for p in paths if mount_of(p) is not None]
        local = open_local(on_p2pfs) if t.local and on_p2pfs else None
        fds = dict(zip(on_p2pfs, local or ()))
        #: Where the bytes come from: "local" (files on disk, p2pfs's local copies
        #: included), "fill" (the daemon writes our memory) or "mount" (FUSE reads).
        self.source = "local" if len(on_p2pfs) == len(fds) else "mount"
        try:
            for p in paths:
                self.shards.append(Shard.open(p, fds.pop(p, None)))
        finally:
            for fd in fds.values():  # a shard failed to open: the rest are ours to close
                os.close(fd)
        _check(self.ckpt, [s.header for s in self.shards], [s.path for s in self.shards])
        sizes = [s.header.data_size for s in self.shards]
        seg = t.segment_size
        clients = None
        if (self.device.type == "cpu" and t.fill and not (self.copy and self.streaming)
                and self.source == "mount" and len(on_p2pfs) == len(paths)):
            clients = open_clients(self.shards)
        if clients is not None:
            self.source = "fill"
            self.sink = FillSink(self.shards, clients)
            self._release.append(self.sink.close)
            plan = plan_aligned(sizes, [s.header.data_start for s in self.shards],
                                self.sink.chunk_sizes(seg))
            self.pipeline = Pipeline(plan, self.sink, threads=t.fill_inflight, sizes=sizes,
                                     window=t.window if self.streaming else None)
            self.pipeline.start()
            return
        if self.device.type == "cuda":
            from ._cuda import PINNED_RINGS, CudaSink

            ring = PINNED_RINGS.get(self.device, t.slots, seg)
            self._release.append(lambda: PINNED_RINGS.put(ring))
            self.sink: Any = CudaSink(self.shards, self.device, ring)
        elif not self.copy:
            self.sink = MapSink(self.shards)
            seg = t.map_segment_size
        elif not self.streaming:
            self.sink = DirectSink(self.shards)
        else:
            bufs = HOST_RINGS.get(t.slots, seg)
            self._release.append(lambda: HOST_RINGS.put(t.slots, seg, bufs))
            self.sink = StagedSink(self.shards, Ring(bufs, wait=lambda i: None))
        self._prefetch = (Prefetcher([s.path for s in self.shards])
                          if t.prefetch and self.source == "mount" else None)
        if self._prefetch is not None:
            self._prefetch.__enter__()
        # A small local file already in the page cache is populated in the calling thread:
        # cheaper than starting readers. Cold, readers win (docs/GPULOAD.md, "Small files").
        inline = (isinstance(self.sink, MapSink) and self.source == "local"
                  and sum(sizes) < t.inline_below and self.sink.cached())
        self.pipeline = Pipeline(plan_reads(sizes, seg), self.sink, threads=t.threads,
                                 sizes=sizes, window=t.window if self.streaming else None,
                                 inline=inline)
        self.pipeline.start()

    def __exit__(self, *exc: object) -> None:
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()
        prefetch = getattr(self, "_prefetch", None)
        if prefetch is not None:
            prefetch.__exit__(None, None, None)
        for release in self._release:
            release()
        for s in self.shards:
            s.close()

    def tensor(self, file: int, k: int) -> torch.Tensor:
        info = self.shards[file].header.tensors[k]
        if isinstance(self.sink, StagedSink):
            return _tensors.view(self.sink.take(file, k), info, base=-info.begin)
        if isinstance(self.sink, MapSink):
            return self.sink.tensor(file, info)
        base = (self.shards[file].header.data_start
                if isinstance(self.sink, (MapSink, FillSink)) else 0)
        return _tensors.view(self.sink.buffer(file), info, base=base)

    def all(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        self.pipeline.join()
        return {t.name: _tensors.convert(self.tensor(f, k), dtype)
                for f, s in enumerate(self.shards) for k, t in enumerate(s.header.tensors)}

    def stream(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        for f, s in enumerate(self.shards):
            for k, t in enumerate(s.header.tensors):
                self.pipeline.wait_until(f, t.end)
                if self.device.type == "cuda":
                    self.sink.ready()
                yield t.name, _tensors.convert(self.tensor(f, k), dtype)
        self.pipeline.join()


def _tuning(kw: dict[str, Any]) -> Tuning:
    try:
        return Tuning(**kw)
    except TypeError as exc:
        raise TypeError(f"gpuload: {exc}") from None


def load_checkpoint(path: str | os.PathLike[str], device: str | int | torch.device, *,
                    single_file: bool, copy: bool, dtype: torch.dtype | None,
                    tuning: dict[str, Any]) -> dict[str, torch.Tensor]:
    dev = parse_device(device)
    tun = _tuning(tuning)
    if single_file:
        if Path(path).is_dir():
            raise ReadError(f"{path}: is a directory (gpuload.load reads a whole checkpoint)")
        ckpt = Checkpoint((Path(path),), None)
    else:
        ckpt = resolve(path)
    with _Session(ckpt, dev, copy=copy, streaming=False, tuning=tun) as s:
        return s.all(dtype)


def iter_checkpoint(path: str | os.PathLike[str], device: str | int | torch.device, *,
                    copy: bool, dtype: torch.dtype | None,
                    tuning: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checks device, tuning and layout now; the returned generator does the reading."""
    dev = parse_device(device)
    tun = _tuning(tuning)
    ckpt = resolve(path)

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        with _Session(ckpt, dev, copy=copy, streaming=True, tuning=tun) as s:
            yield from s.stream(dtype)

    return gen()
