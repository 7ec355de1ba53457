"""The `p2pfs` command line. Parses flags and the TOML config into `Config`; the only
module that reads the environment or talks to the terminal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import click

from .config import Config, load_config, override
from ._perms import ROOT_MODE, private_dir, private_open
from .errors import P2PFSError

log = logging.getLogger("p2pfs")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str) -> None:
    click.echo(f"p2pfs: error: {msg}", err=True)
    sys.exit(1)


def _config(ctx: click.Context, **sections: dict[str, Any]) -> Config:
    cfg = load_config(ctx.obj.get("config"))
    return override(cfg, s3={"endpoint_url": ctx.obj.get("endpoint_url")}, **sections)


def _run_s3(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    import trio
    import trio_asyncio

    async def main() -> Any:
        async with trio_asyncio.open_loop():
            return await fn(*args)

    return trio.run(main)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show p2pfs errors as one clear line and a non-zero exit, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except P2PFSError as exc:
            _fail(str(exc))
        except BaseExceptionGroup as group:  # from inside trio nurseries
            msg = _flatten(group)
            if not msg:
                raise
            _fail(msg)

    return wrapper


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None, dynamic_ncols=True)


@click.group()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (every setting and its default: README).")
@click.option("--endpoint-url", help="S3 endpoint; default from AWS_ENDPOINT_URL / AWS config.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="p2pfs")
@click.pass_context
def main(ctx: click.Context, config: Path | None, endpoint_url: str | None, verbose: bool) -> None:
    """p2pfs: mount model weights from object storage as local, lazily fetched files."""
    ctx.ensure_object(dict)
    ctx.obj.update(config=config, endpoint_url=endpoint_url)
    _setup_logging(verbose)


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("url")
@click.option("--chunk-size", help="Chunk size (default 8MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def publish(ctx: click.Context, src: Path, url: str, chunk_size: str | None, as_json: bool) -> None:
    """Upload directory SRC to URL (s3://bucket/prefix) and index it."""
    from .origin import open_origin, parse_url
    from .publish import publish as do_publish

    cfg = _config(ctx, publish={"chunk_size": chunk_size})
    loc = parse_url(url)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    t0 = time.monotonic()
    with _progress(total, "upload") as bar:
        async def run() -> Any:
            async with open_origin(loc, cfg.s3) as origin:
                return await do_publish(origin, src, loc, chunk_size=cfg.publish.chunk_size,
                                        progress=bar.update)
        m = _run_s3(run)
    _report(m, url, total, time.monotonic() - t0, as_json)


@main.command()
@click.argument("url")
@click.option("--chunk-size", help="Chunk size (default 8MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def index(ctx: click.Context, url: str, chunk_size: str | None, as_json: bool) -> None:
    """Index the objects already under URL in place (no copy) and write the manifest."""
    from .origin import open_origin, parse_url
    from .publish import index as do_index

    cfg = _config(ctx, publish={"chunk_size": chunk_size})
    loc = parse_url(url)
    t0 = time.monotonic()

    async def run() -> Any:
        async with open_origin(loc, cfg.s3) as origin:
            total = sum(o.size for o in await origin.list(loc.prefix))
            with _progress(total, "index") as bar:
                return await do_index(origin, loc, chunk_size=cfg.publish.chunk_size,
                                      concurrency=cfg.fetch.concurrency, progress=bar.update)
    m = _run_s3(run)
    _report(m, url, m.total_size, time.monotonic() - t0, as_json)


def _report(m: Any, url: str, nbytes: int, seconds: float, as_json: bool) -> None:
    out = {"url": url, "digest": m.digest, "files": sum(1 for _ in m.files()), "bytes": nbytes,
           "chunks": sum(len(e.chunks) for e in m.files()), "seconds": round(seconds, 3)}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"{url}: {out['files']} files, {nbytes / 1e6:.1f} MB, {out['chunks']} chunks "
                   f"in {seconds:.1f}s; manifest {m.digest}")


@main.command()
@click.argument("url")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Chunk cache directory.")
@click.option("--cache-size", help="Disk cache budget, e.g. 200GiB.")
@click.option("--memory-size", help="In-memory chunk cache, e.g. 512MiB.")
@click.option("--read-timeout", type=float, help="Seconds before an unservable read fails with EIO.")
@click.option("--concurrency", type=int, help="Parallel origin requests.")
@click.option("--metrics-addr", help="Serve Prometheus metrics at HOST:PORT.")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon log when in the background (default CACHE_DIR/p2pfs.log).")
@click.option("--json", "as_json", is_flag=True, help="Print the mount result as JSON.")
@click.option("--ready-fd", type=int, hidden=True)
@click.pass_context
@_errors
def mount(ctx: click.Context, url: str, mountpoint: Path, cache_dir: Path | None,
          cache_size: str | None, memory_size: str | None, read_timeout: float | None,
          concurrency: int | None, metrics_addr: str | None, foreground: bool,
          log_file: Path | None, as_json: bool, ready_fd: int | None) -> None:
    """Mount URL (s3://bucket/prefix) read-only at MOUNTPOINT."""
    cfg = _config(ctx, cache={"dir": cache_dir, "size": cache_size, "memory_size": memory_size},
                  fetch={"read_timeout": read_timeout, "concurrency": concurrency},
                  mount={"metrics_addr": metrics_addr})
    if not foreground:
        _spawn_background(cfg, mountpoint, log_file, as_json)
        return
    import trio

    from .daemon import run_daemon

    def ready(info: dict[str, Any]) -> None:
        if ready_fd is not None:
            os.write(ready_fd, json.dumps({"ok": True, **info}).encode() + b"\n")
            os.close(ready_fd)
        elif as_json:
            click.echo(json.dumps(info))
        else:
            click.echo(f"mounted {url} at {mountpoint} ({', '.join(info['models'])})", err=True)

    try:
        trio.run(lambda: run_daemon(cfg, url, mountpoint, on_ready=ready,
                                    notify_socket=os.environ.get("NOTIFY_SOCKET")))
    except BaseException as exc:
        msg = _flatten(exc)
        if ready_fd is not None and msg:
            try:
                os.write(ready_fd, json.dumps({"ok": False, "error": msg}).encode() + b"\n")
            except OSError:
                pass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if msg:
            _fail(msg)
        raise


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(filter(None, (_flatten(e) for e in exc.exceptions)))
    if isinstance(exc, P2PFSError):
        return str(exc)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return ""
    if isinstance(exc, RuntimeError) and "fuse" in str(exc).lower():
        return f"FUSE mount failed: {exc} (is /dev/fuse available, and are you root?)"
    return ""


def _spawn_background(cfg: Config, mountpoint: Path, log_file: Path | None, as_json: bool) -> None:
    """Re-run ourselves in the foreground as a detached child; wait for it to be ready."""
    log_file = log_file or cfg.cache.dir / "p2pfs.log"
    if log_file.parent == cfg.cache.dir:
        private_dir(cfg.cache.dir, ROOT_MODE)  # as the daemon makes it (p2pfs/_perms.py)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    argv = sys.argv[1:]
    with open(private_open(log_file, os.O_WRONLY | os.O_APPEND), "ab") as logf:  # 0600
        proc = subprocess.Popen([sys.executable, "-m", "p2pfs", *argv, "--foreground",
                                 "--ready-fd", str(w)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline()
    if not line:
        proc.wait(5)
        tail = log_file.read_text(errors="replace").splitlines()[-5:]
        _fail(f"the daemon exited ({proc.returncode}) before mounting; {log_file}:\n" + "\n".join(tail))
    msg = json.loads(line)
    if not msg.get("ok"):
        _fail(msg.get("error", "mount failed"))
    if as_json:
        click.echo(json.dumps(msg))
    else:
        click.echo(f"mounted {msg['source']} at {mountpoint} (pid {msg['pid']}, "
                   f"models: {', '.join(msg['models'])}, log {log_file})")
        for p in msg.get("problems", []):
            click.echo(f"warning: {p}", err=True)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", is_flag=True, help="Detach now even if files are open.")
@_errors
def unmount(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT (also after the daemon crashed)."""
    from .tune import mount_entry, unmount as do_unmount

    if mount_entry(mountpoint) is None:
        _fail(f"{mountpoint} is not mounted")
    try:
        do_unmount(mountpoint, lazy=lazy)
    except OSError as exc:
        _fail(f"{exc} (files still open? use --lazy)")
    click.echo(f"unmounted {mountpoint}")


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def status(mountpoint: Path, as_json: bool) -> None:
    """Cache use, hit ratio, bytes by source and requests in flight of a mount."""
    from .control import request

    reply = next(request(mountpoint, {"op": "status"}), {})
    if as_json:
        click.echo(json.dumps(reply, indent=1))
        return
    r = reply
    ratio = "n/a" if r.get("hit_ratio") is None else f"{r['hit_ratio']:.1%}"
    src = r.get("bytes_by_source", {})
    click.echo(f"{r['mountpoint']}  <-  {r['source']}  (pid {r['pid']}, up {r['uptime_s']}s)")
    click.echo(f"  models:     {', '.join(m['path'] for m in r['models'])}")
    click.echo(f"  cache:      {r['cache_used_bytes'] / 2**30:.2f} / {r['cache_budget_bytes'] / 2**30:.2f} GiB "
               f"({r['cache_chunks']} chunks, {r['cache_evicted_chunks']} evicted) in {r['cache_dir']}")
    click.echo(f"  hit ratio:  {ratio}  (hits {r['hits']}, misses {r['misses']})")
    click.echo("  bytes:      " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(src.items())))
    click.echo(f"  in flight:  {r['in_flight_chunks']} chunks, write-back pending {r['writeback_pending']}"
               f", dropped {r['writeback_dropped']}")
    p50, p99 = r.get("fetch_latency_p50_s"), r.get("fetch_latency_p99_s")
    if p50 is not None:
        click.echo(f"  fetch:      p50 <= {p50}s, p99 <= {p99}s over {r['origin_requests']} requests")
    if r.get("errors"):
        click.echo(f"  errors:     {r['errors']}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def prefetch(paths: tuple[Path, ...], as_json: bool) -> None:
    """Make files or directories under a p2pfs mount local; returns when they are."""
    from .control import prefetch as do_prefetch

    for p in paths:
        bar = _progress(0, p.name)
        with bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            res = do_prefetch(p, progress=progress)
        if as_json:
            click.echo(json.dumps({"path": str(p), **res}))
        else:
            click.echo(f"{p}: {res['done'] / 1e6:.1f} MB local in {res['seconds']}s")


