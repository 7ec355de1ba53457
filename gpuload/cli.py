"""The `gpuload` command line: inspect, load, warm, bench.

The only module that talks to the terminal. Every error the library raises on purpose, and
every usage error, is one line `gpuload: error: ...` on stderr: exit 1 for a failure, 2
for a usage mistake. No tracebacks (a traceback here means a bug in gpuload), also not for
names the terminal cannot print (`_echo`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .errors import GpuloadError

def _echo(text: str, *, err: bool = False) -> None:
    """click.echo, except that what the terminal's encoding cannot carry (a lone surrogate
    in a tensor name, an undecodable file name) is printed as a backslash escape instead
    of raising. JSON output is ASCII (json.dumps escapes it), so it stays valid."""
    stream = sys.stderr if err else sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    click.echo(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), err=err)


_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "fp16": "float16",
           "float16": "float16", "f32": "float32", "fp32": "float32", "float32": "float32"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pfs", prog_name="gpuload")
def cli() -> None:
    """gpuload: stream safetensors checkpoints into GPU or CPU memory."""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, as_json: bool) -> None:
    """List tensors, dtypes, shapes and bytes of PATH (file, index or directory);
    validates every header (and the index) without reading tensor data."""
    import gpuload

    infos = gpuload.inspect(path)
    dtypes: dict[str, int] = {}
    for info in infos:
        for t in info.header.tensors:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    total = sum(dtypes.values())
    ntensors = sum(len(i.header.tensors) for i in infos)
    if as_json:
        _echo(json.dumps({
            "path": str(path), "tensors": ntensors, "bytes": total, "dtypes": dtypes,
            "shards": [{
                "path": str(i.path), "file_size": i.file_size, "header_size": i.header.header_size,
                "data_start": i.header.data_start, "metadata": i.header.metadata,
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                             "data_offsets": [t.begin, t.end], "bytes": t.nbytes}
                            for t in i.header.tensors]} for i in infos]}))
        return
    for i in infos:
        _echo(f"{i.path}  ({i.file_size} bytes, {len(i.header.tensors)} tensors, "
                   f"header {i.header.header_size} bytes)")
        width = max((len(t.name) for t in i.header.tensors), default=0)
        for t in i.header.tensors:
            _echo(f"  {t.name:<{width}}  {t.dtype:<11} {str(list(t.shape)):<20} {t.nbytes}")
    _echo(f"total: {ntensors} tensors, {total} bytes ({total / 1e9:.3f} GB); "
               + ", ".join(f"{k} {v}" for k, v in sorted(dtypes.items())))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--copy", is_flag=True, help="CPU: into memory we own instead of a private mmap.")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), help="Convert floating tensors.")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--no-prefetch", is_flag=True, help="Do not ask p2pfs to prefetch.")
@click.option("--json", "as_json", is_flag=True,
              help="Print {seconds, bytes, gbps, peak_rss_bytes, rss_anon_bytes, tensors, ...}.")
def load(path: Path, device: str, copy: bool, dtype: str | None, threads: int,
         no_prefetch: bool, as_json: bool) -> None:
    """Load PATH onto DEVICE; report seconds, GB/s and peak host memory."""
    import torch

    import gpuload

    from . import _mem

    dt = getattr(torch, _DTYPES[dtype]) if dtype else None
    t0 = time.perf_counter()
    sd = gpuload.load(path, device=device, copy=copy, dtype=dt, threads=threads,
                      prefetch=not no_prefetch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    mem = _mem.status()
    out = {"path": str(path), "device": device, "mode": "copy" if copy else "default",
           "seconds": round(seconds, 4), "bytes": nbytes,
           "gbps": round(nbytes / seconds / 1e9, 3) if seconds > 0 else None,
           "peak_rss_bytes": mem.get("VmHWM", 0), "rss_anon_bytes": mem.get("RssAnon", 0),
           "tensors": len(sd)}
    if as_json:
        _echo(json.dumps(out))
    else:
        _echo(f"{path}: {len(sd)} tensors, {nbytes / 1e9:.3f} GB to {device} in "
                   f"{seconds:.3f}s ({out['gbps']} GB/s); peak RSS "
                   f"{out['peak_rss_bytes'] / 2**20:.0f} MiB (anonymous now "
                   f"{out['rss_anon_bytes'] / 2**20:.0f} MiB)")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON line per path.")
def warm(paths: tuple[Path, ...], as_json: bool) -> None:
    """Make models on a p2pfs mount local before a server starts; returns when every byte
    is on this node's disk cache. Paths not on p2pfs are already local (noted, exit 0)."""
    from tqdm import tqdm

    import gpuload

    from ._p2pfs import mount_of

    for p in paths:
        if not p.exists():
            raise GpuloadError(f"{p}: no such file or directory")
        if mount_of(p) is None:
            _echo(f"{p}: not on a p2pfs mount, already local", err=True)
            if as_json:
                _echo(json.dumps({"path": str(p), "ok": True, "p2pfs": False}))
            continue
        with tqdm(total=0, desc=p.name, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            res = gpuload.warm(p, progress=progress)
        if as_json:
            _echo(json.dumps({"path": str(p), "p2pfs": True, **res}))
        else:
            _echo(f"{p}: {res.get('done', 0) / 1e6:.1f} MB local in {res.get('seconds')}s")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--rounds", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--cold", is_flag=True, help="Drop the page cache before each run (root).")
@click.option("--settle", type=float, default=3.0, show_default=True,
              help="Seconds to wait after dropping caches.")
@click.option("--method", "methods", multiple=True, help="Only these methods (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def bench(path: Path, device: str, rounds: int, cold: bool, settle: float,
          methods: tuple[str, ...], as_json: bool) -> None:
    """Time gpuload side by side with safetensors and any installed anchor
    (fastsafetensors, runai-model-streamer), until every byte is touched."""
    from . import _api, _bench

    _api.parse_device(device)
    ok, missing = _bench.available()
    chosen = list(methods) or ok
    for m in chosen:
        if m not in _bench.METHODS:
            raise click.UsageError(f"unknown method {m!r}; known: {', '.join(_bench.METHODS)}")
        if m not in ok:
            raise GpuloadError(f"{m} cannot run here: {missing[m]}")
    log = (lambda s: None) if as_json else (lambda s: _echo(s, err=True))
    res = _bench.run(str(path), device, chosen, rounds=rounds, cold=cold, settle=settle, log=log)
    nbytes = sum(t.nbytes for i in _api.inspect(path) for t in i.header.tensors)
    out: dict[str, Any] = {"path": str(path), "device": device, "bytes": nbytes,
                           "cold": cold, "rounds": rounds, "results": res,
                           "not_available": missing}
    if as_json:
        _echo(json.dumps(out))
        return
    base = res.get("gpuload", {}).get("median_s")
    for m, r in res.items():
        ratio = f"  x{r['median_s'] / base:.2f} of gpuload" if base else ""
        _echo(f"{m:<22} median {r['median_s']:.3f}s  "
                   f"{nbytes / r['median_s'] / 1e9:6.2f} GB/s{ratio}")
    for m, why in missing.items():
        _echo(f"{m:<22} not available: {why}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="gpuload", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage mistakes
        _echo(f"gpuload: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.Abort:
        _echo("gpuload: error: aborted", err=True)
        sys.exit(130)
    except GpuloadError as exc:
        _echo(f"gpuload: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # e.g. --cold without root, a broken pipe on stdout
        _echo(f"gpuload: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
