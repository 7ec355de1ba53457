"""`p2pfs-snapshotter`: serve containerd's proxy snapshotter, or pull an image through CRI.

    p2pfs-snapshotter serve --socket /run/p2pfs/snapshotter.sock --root /var/lib/p2pfs-snapshotter \\
        [--layers-mount /var/lib/p2pfs/layers] [--layers s3://models/layers] [--metrics-addr HOST:PORT]
    p2pfs-snapshotter pull REF [--containerd-socket /run/containerd/containerd.sock] [--json]

`serve` tells systemd READY=1 once the socket listens (Type=notify) and stops gracefully
on SIGTERM or SIGINT: calls under way finish (up to 10 s), the store closes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

log = logging.getLogger("snapshotter")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `serve` needs; the defaults are the flags' defaults."""

    socket: Path
    root: Path
    layers_mount: Path | None = None  # the p2pfs mount of the layers prefix; None: no remote layers
    layers_url: str | None = None     # that prefix in the object store (for convert on first pull)
    metrics_addr: str | None = None   # HOST:PORT for /metrics; None: off
    mirror_addr: str | None = None    # HOST:PORT for the image metadata mirror; None: off
    containerd_root: Path | None = Path("/var/lib/containerd")  # its content store: first pulls convert from there
    plain_http: tuple[str, ...] = ()  # registries (host:port) the converter reaches over plain HTTP
    convert_concurrency: int = 1      # layers converted at once on first pull (0: never convert)
    probe_timeout_s: float = 2.0      # how long a remote lower may take to answer a check
    erofs: bool = True                # mount remote layers as EROFS where the kernel and layer allow
    erofs_read_ahead_kb: int = 1024   # read-ahead of those mounts (0: the kernel's 128 KiB)
    workers: int = 16                 # grpc worker threads
    grace_s: float = 10.0             # how long calls under way may finish on SIGTERM

    def __post_init__(self) -> None:
        if self.probe_timeout_s <= 0:
            raise click.BadParameter("must be > 0", param_hint="--probe-timeout")
        if self.convert_concurrency < 0:
            raise click.BadParameter("must be >= 0", param_hint="--convert-concurrency")
        if self.mirror_addr and not self.layers_url:
            raise click.BadParameter("the mirror serves what is stored under --layers: give it",
                                     param_hint="--mirror-addr")
        if self.workers < 1:
            raise click.BadParameter("must be >= 1", param_hint="--workers")
        if len(os.fsencode(self.socket.absolute())) >= 108:
            raise click.BadParameter("a unix socket path must stay under 108 bytes",
                                     param_hint="--socket")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(verbose: bool, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    from p2pfs.daemon import sd_notify as notify

    notify(os.environ.get("NOTIFY_SOCKET"), message)


def _parse_addr(addr: str, flag: str = "--metrics-addr", default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{addr!r} is not HOST:PORT", param_hint=flag)
    return host.strip("[]") or default_host, int(port)


def _remote_layers(config: ServeConfig):
    """The remote layers the config asks for, and the first-pull converter if any."""
    from ._layerfs import NoRemoteLayers
    from ._p2pfs import FirstPullConverter, P2pfsLayers, content_store_dir

    if not config.layers_mount:
        return NoRemoteLayers(), None
    converter = None
    if config.layers_url and config.convert_concurrency > 0:
        layers = P2pfsLayers(config.layers_mount, timeout=config.probe_timeout_s)
        converter = FirstPullConverter(
            config.layers_url,
            content_dir=content_store_dir(config.containerd_root) if config.containerd_root else None,
            plain_http_registries=config.plain_http, concurrency=config.convert_concurrency,
            on_converted=layers.attach)
        layers.converter = converter
        return layers, converter
    return P2pfsLayers(config.layers_mount, timeout=config.probe_timeout_s), None


def _image_mirror(config: ServeConfig, layers):
    """With a layers prefix: the recorder that stores each pulled image's metadata there,
    and (with --mirror-addr) the mirror serving it. (loop, recorder, server); Nones when
    off. The object store opens in the background: a failure to open it is the recorder's
    and the mirror's to report (pulls work without them)."""
    from ._mirror import MirrorServer
    from ._ocistore import ImageRecorder, MirrorReader, OriginLoop
    from ._p2pfs import content_store_dir

    if not config.layers_url or not (hasattr(layers, "images") or config.mirror_addr):
        return None, None, None
    from p2pfs.origin import parse_url

    loop = OriginLoop(parse_url(config.layers_url)).start(wait=False)
    recorder = None
    if hasattr(layers, "images"):
        recorder = layers.images = ImageRecorder(
            loop, content_dir=content_store_dir(config.containerd_root) if config.containerd_root else None,
            plain_http_registries=config.plain_http)
    server = None
    if config.mirror_addr:
        host, port = _parse_addr(config.mirror_addr, "--mirror-addr", "127.0.0.1")
        server = MirrorServer(MirrorReader(loop), host, port).start()
        log.info("image metadata mirror on %s (a registry's fallback host in hosts.toml)", server.url)
    return loop, recorder, server


def _erofs_lowers(config: ServeConfig):
    if not (config.erofs and config.layers_mount):
        return None
    from p2pfs import erofs

    from ._erofs import ErofsLowers

    if not erofs.supported():
        log.warning("this kernel has no EROFS: remote layers are served through FUSE only")
        return None
    return ErofsLowers(config.root / "erofs", read_ahead_kb=config.erofs_read_ahead_kb)


def serve(config: ServeConfig, *, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (SIGTERM/SIGINT set it when called from the main thread)."""
    from . import _grpc
    from ._http import HttpEndpoint
    from ._store import Store
    from .snapshotter import Snapshotter

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    remote, converter = _remote_layers(config)
    store = Store(config.root)
    oci_loop = recorder = mirror = None
    try:
        sn = Snapshotter(store, remote, erofs=_erofs_lowers(config))
        if converter is not None:
            from ._p2pfs import ConverterMetrics

            sn.metrics.registry.register(ConverterMetrics(converter))
        oci_loop, recorder, mirror = _image_mirror(config, remote)

        def status() -> dict:
            reg = sn.metrics.registry
            return {
                "socket": str(config.socket), "root": str(store.root),
                "layers_mount": str(config.layers_mount or ""), "layers_url": config.layers_url or "",
                "snapshots": {k.filter_name: n for k, n in store.counts().items()},
                "layers": {served: int(reg.get_sample_value(
                    "p2pfs_snapshotter_layers_total", {"served": served}) or 0)
                    for served in ("remote", "local")},
                "unavailable": int(reg.get_sample_value("p2pfs_snapshotter_unavailable_total") or 0),
                "conversions": converter.status() if converter is not None else None,
                "mirror": mirror.url if mirror is not None else None,
                "object_store": oci_loop.state() if oci_loop is not None else None,
            }

        metrics = None
        if config.metrics_addr:
            host, port = _parse_addr(config.metrics_addr)
            metrics = HttpEndpoint(host, port, sn.metrics.registry, status).start()
            log.info("metrics and status on http://%s:%d/metrics, /status", host, metrics.server_port)
        if recorder is not None or mirror is not None:
            from ._mirror import MirrorMetrics

            sn.metrics.registry.register(MirrorMetrics(mirror, recorder))
        server = _grpc.serve(sn, config.socket, workers=config.workers)
        log.info("root %s, layers %s%s", store.root, config.layers_mount or "(none: every layer pulled normally)",
                 f" from {config.layers_url}" if config.layers_url else "")
        sd_notify(f"READY=1\nSTATUS=serving {config.socket}")
        stop.wait()
        log.info("stopping: letting calls under way finish (up to %gs)", config.grace_s)
        sd_notify("STOPPING=1")
        _grpc.shutdown(server, config.socket, config.grace_s)
        if metrics is not None:
            metrics.shutdown()
    finally:
        if converter is not None:
            converter.close()
        if mirror is not None:
            mirror.close()
        if recorder is not None:
            recorder.close()
        if oci_loop is not None:
            oci_loop.close()
        store.close()
        _grpc.unlink_socket(config.socket)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--json-logs", is_flag=True, help="Log one JSON object per line.")
def main(verbose: bool, json_logs: bool) -> None:
    """containerd proxy snapshotter serving image layers from a p2pfs mount."""
    _setup_logging(verbose, json_logs)


@main.command("serve")
@click.option("--socket", "socket_", type=click.Path(path_type=Path), required=True,
              help="Unix socket containerd's proxy_plugins entry points at.")
@click.option("--root", type=click.Path(path_type=Path), required=True,
              help="State dir: metadata.db and the snapshots' dirs.")
@click.option("--layers-mount", type=click.Path(path_type=Path), default=None,
              help="Where `p2pfs mount` shows the layers prefix (one dir per layer blob's sha256). "
                   "Without it every layer is pulled normally.")
@click.option("--layers", "layers_url", default=None,
              help="That layers prefix in the object store (for converting layers on first pull).")
@click.option("--metrics-addr", default=None, help="HOST:PORT to serve /metrics on.")
@click.option("--mirror-addr", default=None, metavar="HOST:PORT",
              help="Serve the image metadata mirror (manifests, configs, tags stored under "
                   "--layers) on HOST:PORT (HOST defaults to 127.0.0.1), for hosts.toml's "
                   "fallback `server`.")
@click.option("--probe-timeout", "probe_timeout_s", type=float, default=2.0, show_default=True,
              help="Seconds a remote layer may take to answer before calls get UNAVAILABLE.")
@click.option("--erofs/--no-erofs", default=True, show_default=True,
              help="Mount each remote layer as EROFS (metadata served by the kernel, data by "
                   "p2pfs) where the kernel and the layer allow; --no-erofs: the FUSE dirs.")
@click.option("--erofs-read-ahead-kb", type=click.IntRange(0, 1 << 20), default=1024,
              show_default=True, help="Read-ahead of the EROFS layer mounts (0: the kernel's).")
@click.option("--workers", type=int, default=16, show_default=True, help="gRPC worker threads.")
@click.option("--containerd-root", type=click.Path(path_type=Path), default="/var/lib/containerd",
              show_default=True, help="containerd's root: layers pulled normally are converted "
                                      "from its content store.")
@click.option("--plain-http", multiple=True, metavar="HOST:PORT",
              help="A registry the converter reaches over plain HTTP (repeatable).")
@click.option("--convert-concurrency", type=int, default=1, show_default=True,
              help="Layers converted at once after a normal pull (0: never convert).")
def serve_cmd(socket_: Path, root: Path, layers_mount: Path | None, layers_url: str | None,
              metrics_addr: str | None, mirror_addr: str | None, probe_timeout_s: float, erofs: bool,
              erofs_read_ahead_kb: int, workers: int, containerd_root: Path, plain_http: tuple[str, ...],
              convert_concurrency: int) -> None:
    """Serve containerd's snapshots API on SOCKET."""
    config = ServeConfig(socket=socket_.absolute(), root=root.absolute(), layers_mount=layers_mount,
                         layers_url=layers_url, metrics_addr=metrics_addr, mirror_addr=mirror_addr,
                         probe_timeout_s=probe_timeout_s, erofs=erofs,
                         erofs_read_ahead_kb=erofs_read_ahead_kb, workers=workers,
                         containerd_root=containerd_root.absolute(), plain_http=plain_http,
                         convert_concurrency=convert_concurrency)
    try:
        serve(config)
    except OSError as exc:
        click.echo(f"p2pfs-snapshotter: error: {exc}", err=True)
        sys.exit(1)


@main.command("status")
@click.option("--metrics-addr", default="127.0.0.1:9465", show_default=True,
              help="The HOST:PORT `serve --metrics-addr` listens on.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait.")
def status_cmd(metrics_addr: str, as_json: bool, timeout: float) -> None:
    """What a running snapshotter serves: snapshots, layers served remotely or pulled
    normally, conversions on first pull (queued, running, done, failed)."""
    import urllib.error
    import urllib.request

    host, port = _parse_addr(metrics_addr)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            st = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        click.echo(f"p2pfs-snapshotter: error: no status from {url}: {exc} (is `serve` running "
                   "with --metrics-addr?)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    conv = st.get("conversions") or {}
    click.echo(f"snapshotter {st['socket']} (root {st['root']})\n"
               f"  layers mount {st['layers_mount'] or '-'}  from {st['layers_url'] or '-'}\n"
               f"  snapshots    " + ", ".join(f"{k} {n}" for k, n in st["snapshots"].items()) + "\n"
               f"  layers       {st['layers']['remote']} served remotely, {st['layers']['local']} pulled "
               f"normally; {st['unavailable']} refused (mount unavailable)\n"
               + (f"  conversions  {conv.get('queued', 0)} queued, {conv.get('running', 0)} running, "
                  f"{conv.get('converted', 0)} converted, {conv.get('existed', 0)} already there, "
                  f"{conv.get('locked_elsewhere', 0)} by another node, {conv.get('failed', 0)} failed, "
                  f"{conv.get('dropped', 0)} dropped" + (f" (last error: {conv['last_error']})"
                                                         if conv.get("last_error") else "")
                  if st.get("conversions") is not None else "  conversions  off")
               + f"\n  object store {st.get('object_store') or 'none (no --layers)'}")


@main.command("pull")
@click.argument("ref")
@click.option("--containerd-socket", default="/run/containerd/containerd.sock", show_default=True,
              help="containerd's gRPC socket (its CRI image service).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds for the pull.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_cmd(ref: str, containerd_socket: str, timeout: float, as_json: bool) -> None:
    """Pull REF through containerd's CRI image service, as kubelet does (so the snapshotter
    gets the layer labels it needs to serve layers lazily)."""
    from ._cri import CRIError, ImageService

    start = time.monotonic()
    try:
        with ImageService(containerd_socket, timeout=timeout) as cri:
            image_ref = cri.pull(ref)
    except CRIError as exc:
        click.echo(f"p2pfs-snapshotter: error: {exc}", err=True)
        sys.exit(1)
    seconds = time.monotonic() - start
    if as_json:
        click.echo(json.dumps({"ref": ref, "image_ref": image_ref, "seconds": round(seconds, 3)}))
    else:
        click.echo(f"pulled {ref} as {image_ref} in {seconds:.2f}s")


if __name__ == "__main__":
    main()
