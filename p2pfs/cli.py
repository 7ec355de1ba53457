"""The `p2pfs` command line. Parses flags and the TOML config into `Config`; the only
module that reads the environment or talks to the terminal.

Global options (--config, --endpoint-url, -v) are accepted before or after the command,
as aws-cli does: every command carries them too, and a value given after the command
wins. Paths from flags and the config file are made absolute here, at startup.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import click

from .config import Config, absolute_paths, complete, load_config, override
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
    opts = ctx.find_root().obj
    path = opts.get("config")
    cfg = load_config(Path(os.path.abspath(path)) if path else None)
    cfg = override(cfg, s3={"endpoint_url": opts.get("endpoint_url")}, **sections)
    return absolute_paths(cfg)


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
        except OSError as exc:  # the environment's refusal (a full disk, a closed pipe)
            _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
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


def _global_options() -> list[click.Option]:
    """Fresh instances for the group and for each command (click binds them to one)."""
    return [
        click.Option(["--config"], type=click.Path(dir_okay=False, path_type=Path),
                     help="TOML config file (every setting and its default: README)."),
        click.Option(["--endpoint-url"],
                     help="S3 endpoint; default from AWS_ENDPOINT_URL / AWS config."),
        click.Option(["-v", "--verbose"], is_flag=True, help="Debug logging."),
    ]


_GLOBAL = tuple(o.name for o in _global_options())


class _TakesGlobals:
    """Mixin: a command (or subgroup) that also takes the global options after its name."""

    params: list[click.Parameter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.params.extend(_global_options())

    def invoke(self, ctx: click.Context) -> Any:
        opts = ctx.find_root().obj
        for name in _GLOBAL:
            value = ctx.params.pop(name, None)
            if value:  # given after the command: it wins over one given before
                opts[name] = value
        _setup_logging(bool(opts.get("verbose")))
        return super().invoke(ctx)  # type: ignore[misc]


class _Command(_TakesGlobals, click.Command):
    """A command that also takes the global options, after its own name."""


class _Group(click.Group):
    command_class = _Command


class _SubGroup(_TakesGlobals, _Group):
    """A group under `main` (`p2pfs image ...`): global options after its name too."""


@click.group(cls=_Group, params=_global_options())
@click.version_option(package_name="p2pfs")
@click.pass_context
def main(ctx: click.Context, config: Path | None, endpoint_url: str | None, verbose: bool) -> None:
    """p2pfs: mount model weights from object storage as local, lazily fetched files."""
    ctx.ensure_object(dict)
    ctx.obj.update(config=config, endpoint_url=endpoint_url, verbose=verbose)


_CHUNK_HASH = click.option(
    "--chunk-hash", type=click.Choice(["blake3", "sha256"]),
    help="Chunk digests: blake3 (default; a v3 manifest) or sha256 (mountable by p2pfs "
         "before v3 too).")


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("url")
@click.option("--chunk-size", help="Chunk size (default 8MiB).")
@_CHUNK_HASH
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def publish(ctx: click.Context, src: Path, url: str, chunk_size: str | None,
            chunk_hash: str | None, as_json: bool) -> None:
    """Upload directory SRC to URL (s3://bucket/prefix) and index it."""
    from .origin import open_origin, parse_url
    from .publish import publish as do_publish

    cfg = _config(ctx, publish={"chunk_size": chunk_size, "chunk_hash": chunk_hash})
    loc = parse_url(url)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    t0 = time.monotonic()
    with _progress(total, "upload") as bar:
        async def run() -> Any:
            async with open_origin(loc, cfg.s3) as origin:
                return await do_publish(origin, src, loc, chunk_size=cfg.publish.chunk_size,
                                        chunk_hash=cfg.publish.chunk_hash, progress=bar.update)
        m = _run_s3(run)
    _report(m, url, total, time.monotonic() - t0, as_json)


@main.command()
@click.argument("url")
@click.option("--chunk-size", help="Chunk size (default 8MiB).")
@_CHUNK_HASH
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def index(ctx: click.Context, url: str, chunk_size: str | None, chunk_hash: str | None,
          as_json: bool) -> None:
    """Index the objects already under URL in place (no copy) and write the manifest."""
    from .origin import open_origin, parse_url
    from .publish import index as do_index

    cfg = _config(ctx, publish={"chunk_size": chunk_size, "chunk_hash": chunk_hash})
    loc = parse_url(url)
    t0 = time.monotonic()

    async def run() -> Any:
        async with open_origin(loc, cfg.s3) as origin:
            total = sum(o.size for o in await origin.list(loc.prefix))
            with _progress(total, "index") as bar:
                return await do_index(origin, loc, chunk_size=cfg.publish.chunk_size,
                                      chunk_hash=cfg.publish.chunk_hash,
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
@click.option("--control-group", help="Group (name or gid) allowed on the control socket "
              "besides root and the daemon's user.")
@click.option("--peer-listen", metavar="HOST:PORT",
              help="Serve and fetch chunks from peers; this node's address (and id).")
@click.option("--peers", "peer_members", metavar="LIST",
              help="Static members, comma separated HOST:PORT (this node may be one).")
@click.option("--peers-dns", metavar="NAME:PORT",
              help="Members: every A/AAAA record of NAME (a headless Service), re-resolved.")
@click.option("--cluster-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File with the cluster token (a second line: the next or previous one).")
@click.option("--peer-replicas", type=int, help="Nodes owning each chunk (default 1).")
@click.option("--allow-empty", is_flag=True, default=None,
              help="Mount even if nothing is published under URL yet (image layers).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon log when in the background (default CACHE_DIR/p2pfs.log).")
@click.option("--json", "as_json", is_flag=True, help="Print the mount result as JSON.")
@click.option("--ready-fd", type=int, hidden=True)
@click.pass_context
@_errors
def mount(ctx: click.Context, url: str, mountpoint: Path, cache_dir: Path | None,
          cache_size: str | None, memory_size: str | None, read_timeout: float | None,
          concurrency: int | None, metrics_addr: str | None, control_group: str | None,
          peer_listen: str | None, peer_members: str | None, peers_dns: str | None,
          cluster_token_file: Path | None, peer_replicas: int | None, allow_empty: bool | None,
          foreground: bool,
          log_file: Path | None, as_json: bool, ready_fd: int | None) -> None:
    """Mount URL (s3://bucket/prefix) read-only at MOUNTPOINT."""
    # complete(): [peers] rules across layers, for the mount only (publish and index may
    # read the nodes' config file, whose listen address comes from the mount's flag).
    cfg = complete(_config(
        ctx, cache={"dir": cache_dir, "size": cache_size, "memory_size": memory_size},
        fetch={"read_timeout": read_timeout, "concurrency": concurrency},
        mount={"metrics_addr": metrics_addr, "control_group": control_group,
               "allow_empty": allow_empty},
        peers={"listen": peer_listen, "members": peer_members, "dns": peers_dns,
               "token_file": cluster_token_file, "replicas": peer_replicas}))
    mountpoint = Path(os.path.abspath(mountpoint))
    if not foreground:
        _spawn_background(cfg, mountpoint, log_file and Path(os.path.abspath(log_file)), as_json)
        return
    # Every path is absolute by now; leave the directory we were started in, so the
    # daemon keeps no directory busy (it could not be unmounted) and no later relative
    # path can work by accident.
    os.chdir("/")
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
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds to wait for the daemon's answer.")
@_errors
def status(mountpoint: Path, as_json: bool, timeout: float) -> None:
    """Cache use, hit ratio, bytes by source and requests in flight of a mount."""
    from .control import control_socket

    reply = ask_status(control_socket(mountpoint), timeout=timeout)
    if as_json:
        click.echo(json.dumps(reply, indent=1))
    else:
        click.echo(format_status(reply))


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("paths", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds to wait for the daemon's answer.")
@_errors
def refresh(mountpoint: Path, paths: tuple[str, ...], as_json: bool, timeout: float) -> None:
    """Show models or image layers published since MOUNTPOINT was mounted, without
    remounting: those at PATHS (directories under the mount), or all new ones."""
    from .control import refresh as do_refresh

    reply = do_refresh(mountpoint, list(paths) if paths else None, timeout=timeout)
    if as_json:
        click.echo(json.dumps(reply))
        return
    click.echo(f"{len(reply['added'])} added, {reply['models']} mounted"
               + "".join(f"\n  + {p}" for p in reply["added"])
               + "".join(f"\n  ! {p}" for p in reply["problems"]))


#: Largest status reply read (a mount of many models lists each one).
MAX_REPLY = 16 << 20


def ask_status(sock: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """The status reply of the daemon at control socket `sock`. Every way this can fail
    (unreachable, no answer in `timeout` seconds, an empty, garbled or refused reply) is
    a P2PFSError with one line saying which."""
    where = f"the p2pfs daemon at {sock}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        buf = b""
        try:
            s.connect(sock)
            s.sendall(b'{"op": "status"}\n')
            while b"\n" not in buf and len(buf) <= MAX_REPLY:
                data = s.recv(1 << 16)
                if not data:
                    break
                buf += data
        except TimeoutError:
            raise P2PFSError(f"{where} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise P2PFSError(f"cannot reach {where}: {exc.strerror or exc}") from None
    line = buf.split(b"\n", 1)[0]
    if not line.strip():
        raise P2PFSError(f"{where} closed the connection without an answer")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        raise P2PFSError(f"{where} sent a garbled answer: {_brief(line)}") from None
    if not isinstance(reply, dict):
        raise P2PFSError(f"{where} sent a garbled answer: {_brief(line)}")
    if reply.get("ok") is not True:
        raise P2PFSError(f"{where} refused the status request: {reply.get('error', 'no reason given')}")
    return reply


def _brief(raw: bytes, limit: int = 80) -> str:
    text = repr(raw[:limit])[2:-1]
    return text + ("..." if len(raw) > limit else "")


def format_status(r: dict[str, Any]) -> str:
    """A status reply as aligned sections a person reads (`--json` gives the reply)."""
    def get(key: str, fmt: Callable[[Any], str] = str) -> str:
        value = r.get(key)
        try:
            return "-" if value is None else fmt(value)
        except (TypeError, ValueError):
            return str(value)

    def count(source: dict[str, Any] | Any, key: str) -> str:
        return str(source.get(key, 0)) if isinstance(source, dict) else "-"

    hits = r.get("hits") if isinstance(r.get("hits"), dict) else {}
    by_source = r.get("bytes_by_source") if isinstance(r.get("bytes_by_source"), dict) else {}
    errors = r.get("errors") if isinstance(r.get("errors"), dict) else {}
    models = r.get("models") if isinstance(r.get("models"), list) else []
    p50, p99 = r.get("fetch_latency_p50_s"), r.get("fetch_latency_p99_s")
    sections: list[tuple[str, list[tuple[str, ...]]]] = [
        ("mount", [
            ("mountpoint", get("mountpoint")),
            ("source", get("source")),
            ("pid", get("pid")),
            ("uptime", get("uptime_s", lambda v: f"{v}s")),
            ("models", ", ".join(str(m.get("path")) if isinstance(m, dict) else str(m)
                                 for m in models) or "-"),
            *(("problem", str(p)) for p in r.get("model_problems") or []),
            ("metrics", get("metrics_url")),
        ]),
        ("cache", [
            ("directory", get("cache_dir")),
            ("disk", f"{get('cache_used_bytes', _bytes)} of {get('cache_budget_bytes', _bytes)}"),
            ("chunks", f"{get('cache_chunks')} ({get('cache_evicted_chunks')} evicted, "
                       f"{get('cache_corrupt_dropped')} corrupt dropped)"),
            ("files", f"{get('cache_files')} ({get('cache_sealed_files')} whole and checked; "
                      f"{get('local_opens')} handed out)"),
            ("memory", get("memory_cache_bytes", _bytes)),
            ("hit ratio", get("hit_ratio", lambda v: f"{v:.1%}")),
        ]),
        ("chunks by source", [
            ("", "hits", "misses", "bytes"),
            ("memory", count(hits, "memory"), "", "-"),
            ("disk", count(hits, "disk"), "", _bytes(by_source.get("disk", 0))),
            *([("peer", count(hits, "peer"), "", _bytes(by_source.get("peer", 0)))]
              if "peer" in by_source or "peer" in hits else []),
            ("origin", "", get("misses"), _bytes(by_source.get("origin", 0))),
        ]),
        ("origin", [
            ("requests", get("origin_requests")),
            ("latency", "-" if p50 is None else f"p50 <= {p50}s, p99 <= {p99}s"),
            ("in flight", f"{get('in_flight_chunks')} chunks"),
        ]),
        ("errors", [(str(k), str(v)) for k, v in sorted(errors.items())] or [("none", "")]),
        ("write-back", [
            ("done", get("writeback_done")),
            ("pending", get("writeback_pending")),
            ("dropped", get("writeback_dropped")),
        ]),
        *([("peers", _peer_rows(r["peers"]))] if isinstance(r.get("peers"), dict) else []),
    ]
    rows = [row for _, rs in sections for row in rs]
    # A column is as wide as its widest cell that is not the last of its row.
    widths = [max(len(row[i]) for row in rows if len(row) > i + 1)
              for i in range(max(len(row) for row in rows) - 1)]
    out = []
    for title, rs in sections:
        out.append(title)
        for row in rs:
            cells = [c.ljust(w) if j < len(row) - 1 else c
                     for j, (c, w) in enumerate(zip(row, [*widths, 0]))]
            out.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(out)


def _peer_rows(peers: dict[str, Any]) -> list[tuple[str, ...]]:
    """This node, then one row per member: its state and the bytes moved each way."""
    members = peers.get("members") if isinstance(peers.get("members"), list) else []
    rows: list[tuple[str, ...]] = [("self", str(peers.get("self", "-"))),
                                   ("", "state", "from it", "to it", "requests")]
    for m in members:
        if not isinstance(m, dict):
            continue
        rows.append((str(m.get("id", "?")), str(m.get("state", "-")),
                     _bytes_or_dash(m.get("bytes_from")), _bytes_or_dash(m.get("bytes_to")),
                     _counts(m.get("requests"))))
    if not members:
        rows.append(("members", "none"))
    return rows


def _counts(value: Any) -> str:
    """{"ok": 3, "busy": 1} -> 'ok 3, busy 1' (requests by result)."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return "-" if value is None else str(value)


def _bytes_or_dash(n: Any) -> str:
    try:
        return "-" if n is None else _bytes(n)
    except (TypeError, ValueError):
        return str(n)


def _bytes(n: Any) -> str:
    """1536 -> '1.5 KiB'."""
    n = int(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


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

            try:
                res = do_prefetch(p, progress=progress)
            except ValueError as exc:  # a line that is not JSON
                raise P2PFSError(f"prefetch of {p}: garbled answer from the daemon ({exc})") from None
        if as_json:
            click.echo(json.dumps({"path": str(p), **res}))
        else:
            click.echo(f"{p}: {res.get('done', 0) / 1e6:.1f} MB local in {res.get('seconds')}s")




@main.group(cls=_SubGroup)
def image() -> None:
    """Container image layers: convert them so containers start lazily from p2pfs."""


@image.command("convert-layer")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("url")
@click.option("--media-type", help="The blob's media type (default: told by its first bytes).")
@_CHUNK_HASH
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def convert_layer_cmd(ctx: click.Context, file: Path, url: str, media_type: str | None,
                      chunk_hash: str | None, as_json: bool) -> None:
    """Convert the layer blob FILE (tar, tar+gzip or tar+zstd) into a layer under URL
    (s3://bucket/prefix): directory <sha256 hex of FILE> on a mount of URL."""
    import hashlib

    from .image import convert_layer
    from .origin import open_origin, parse_url

    cfg = _config(ctx, publish={"chunk_hash": chunk_hash})
    loc = parse_url(url)
    size = file.stat().st_size
    h = hashlib.sha256()  # first, so a layer converted before is answered without work
    with _progress(size, "hash") as bar, open(file, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            bar.update(len(block))
    with _progress(size, "convert") as bar:
        async def run() -> Any:
            async with open_origin(loc, cfg.s3) as origin:
                return await convert_layer(origin, loc, lambda: open(file, "rb"),
                                           media_type=media_type,
                                           expected_digest="sha256:" + h.hexdigest(),
                                           progress=bar.update,
                                           chunk_hash=cfg.publish.chunk_hash)
        res = _run_s3(run)
    if as_json:
        click.echo(json.dumps({"url": url, **res.to_json()}))
    elif res.existed:
        click.echo(f"{url}/{res.hex}: converted before ({res.entries} entries); nothing to do")
    else:
        click.echo(f"{url}/{res.hex}: {res.entries} entries, {res.files} files, "
                   f"{res.bytes_in / 1e6:.1f} MB of tar; {res.stored_bytes / 1e6:.1f} MB stored, "
                   f"{res.dedup_bytes / 1e6:.1f} MB deduplicated in {res.seconds:.1f}s")


@image.command("convert")
@click.argument("ref")
@click.argument("url")
@click.option("--plain-http", is_flag=True, help="HTTP, not HTTPS, to the registry (a local one).")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]",
              help="The image of a multi-platform index to convert (default: this machine's).")
@click.option("--username", help="Registry user; the password comes from --password-stdin or "
              "P2PFS_REGISTRY_PASSWORD.")
@click.option("--password-stdin", is_flag=True, help="Read the registry password from stdin.")
@click.option("--concurrency", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Layers converted at once.")
@_CHUNK_HASH
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@_errors
def convert(ctx: click.Context, ref: str, url: str, plain_http: bool, platform_: str | None,
            username: str | None, password_stdin: bool, concurrency: int, chunk_hash: str | None,
            as_json: bool) -> None:
    """Convert every layer of image REF (registry/name:tag or @sha256:...) into layers under
    URL (s3://bucket/prefix), skipping layers converted before."""
    from .image._images import convert_image
    from .image._oci import Platform, parse_reference, unique_layers
    from .image._registry import Registry
    from .origin import open_origin, parse_url

    cfg = _config(ctx, publish={"chunk_hash": chunk_hash})
    loc = parse_url(url)
    reference = parse_reference(ref)
    registry = Registry(plain_http=plain_http,
                        credentials=_registry_credentials(reference.registry, username, password_stdin))
    resolved = registry.resolve(reference, Platform.parse(platform_) if platform_ else None)
    total = sum(d.size for d in unique_layers(resolved.layers))
    with _progress(total, "layers") as bar:
        async def run() -> Any:
            async with open_origin(loc, cfg.s3) as origin:
                return await convert_image(origin, loc, resolved, registry=registry,
                                           progress=bar.update, concurrency=concurrency,
                                           chunk_hash=cfg.publish.chunk_hash)
        res = _run_s3(run)
    if as_json:
        click.echo(json.dumps({"url": url, **res.to_json()}))
    else:
        click.echo(f"{res.ref} ({res.platform or 'unknown platform'}, {res.manifest_digest}): "
                   f"{len(res.layers)} layers, {res.converted} converted, {res.skipped} skipped; "
                   f"{res.blob_bytes / 1e6:.1f} MB of blobs, {res.stored_bytes / 1e6:.1f} MB stored, "
                   f"{res.dedup_bytes / 1e6:.1f} MB deduplicated in {res.seconds:.1f}s")


def _registry_credentials(host: str, username: str | None, password_stdin: bool) -> dict[str, Any]:
    """Flags, then P2PFS_REGISTRY_USERNAME/PASSWORD (both for REF's registry), then docker's
    config.json `auths` ($DOCKER_CONFIG or ~/.docker; credential helpers are not run)."""
    from .image._registry import Credentials, docker_config_auths

    if password_stdin and not username:
        raise click.UsageError("--password-stdin needs --username")
    if username:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif "P2PFS_REGISTRY_PASSWORD" in os.environ:
            password = os.environ["P2PFS_REGISTRY_PASSWORD"]
        else:
            raise click.UsageError("--username needs --password-stdin or P2PFS_REGISTRY_PASSWORD")
        return {host: Credentials(username, password)}
    env_user = os.environ.get("P2PFS_REGISTRY_USERNAME")
    if env_user:
        return {host: Credentials(env_user, os.environ.get("P2PFS_REGISTRY_PASSWORD", ""))}
    config_dir = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    return docker_config_auths(Path(config_dir) / "config.json")
