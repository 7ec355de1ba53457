"""The gRPC adapter: snapshots.v1 on a unix socket, over `Snapshotter`.

The only module that knows gRPC: messages in, `Snapshotter` calls, messages out, and our
exception tree mapped to the status codes containerd's errdefs maps back. Anything else
is a bug of ours (or the disk's): logged with its traceback, answered UNKNOWN.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc

from . import _errors as errors
from . import _proto as pb
from ._metadata import Mount, Snapshot
from .snapshotter import Snapshotter

log = logging.getLogger("snapshotter.grpc")

_CODES: list[tuple[type[errors.SnapshotterError], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]
#: Infos per List response message (containerd's own server sends them in batches too).
LIST_BATCH = 100


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _mounts(mounts: list[Mount]) -> list[Any]:
    return [pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def info(snap: Snapshot) -> Any:
    msg = pb.Info(name=snap.key, parent=snap.parent, kind=int(snap.kind), labels=dict(snap.labels))
    msg.created_at.FromNanoseconds(snap.created_ns)
    msg.updated_at.FromNanoseconds(snap.updated_ns)
    return msg


class Servicer:
    """One method per RPC; each returns the response message."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def Prepare(self, req: Any) -> Any:
        return pb.PrepareSnapshotResponse(mounts=_mounts(self.sn.prepare(req.key, req.parent, req.labels)))

    def View(self, req: Any) -> Any:
        return pb.ViewSnapshotResponse(mounts=_mounts(self.sn.view(req.key, req.parent, req.labels)))

    def Mounts(self, req: Any) -> Any:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(req.key)))

    def Commit(self, req: Any) -> Any:
        self.sn.commit(req.name, req.key, req.labels)
        return pb.Empty()

    def Remove(self, req: Any) -> Any:
        self.sn.remove(req.key)
        return pb.Empty()

    def Stat(self, req: Any) -> Any:
        return pb.StatSnapshotResponse(info=info(self.sn.stat(req.key)))

    def Update(self, req: Any) -> Any:
        snap = self.sn.update(req.info.name, req.info.labels, list(req.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info(snap))

    def List(self, req: Any) -> Iterator[Any]:
        snaps = self.sn.list(list(req.filters))
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info(s) for s in snaps[i:i + LIST_BATCH]])

    def Usage(self, req: Any) -> Any:
        size, inodes = self.sn.usage(req.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, req: Any) -> Any:
        self.sn.cleanup()
        return pb.Empty()


def _wrap(name: str, fn: Any, sn: Snapshotter, stream: bool) -> Any:
    def fail(exc: BaseException, context: grpc.ServicerContext) -> None:
        code = code_for(exc)
        if not isinstance(exc, errors.ServedRemotely):
            sn.metrics.errors.labels(method=name, code=code.name).inc()
        if code == grpc.StatusCode.UNKNOWN:
            log.exception("%s failed", name)
        elif code == grpc.StatusCode.UNAVAILABLE:
            # The one refusal an operator must act on: the layers mount does not answer.
            log.warning("%s: UNAVAILABLE: %s (is the p2pfs daemon of the layers mount running? "
                        "`p2pfs status <mount>`; restarting it serves new containers)", name, exc)
        else:
            log.debug("%s: %s: %s", name, code.name, exc)
        context.abort(code, str(exc))

    if stream:
        def call_stream(req: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(req)
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                fail(exc, context)
        return call_stream

    def call(req: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(req)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            fail(exc, context)

    return call


def handler(snapshotter: Snapshotter) -> grpc.GenericRpcHandler:
    servicer = Servicer(snapshotter)
    handlers = {}
    for name, (req, resp, stream) in pb.RPCS.items():
        make = grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(_wrap(name, getattr(servicer, name), snapshotter, stream),
                              request_deserializer=pb.message(req).FromString,
                              response_serializer=pb.message(resp).SerializeToString)
    return grpc.method_handlers_generic_handler(f"{pb.PACKAGE}.{pb.SERVICE}", handlers)


#: sun_path's size on Linux: a unix socket's path must be shorter.
_SUN_PATH_MAX = 108


def serve(snapshotter: Snapshotter, socket_path: str | Path, *, workers: int = 16) -> grpc.Server:
    """Listen on `socket_path` (a stale socket file is replaced) and start serving; stop with
    `shutdown()`. The socket is private to root (mode 0600): containerd runs as root.

    The path appears only once the server accepts: the socket is bound and listening under a
    temporary name in the same directory and then renamed into place. containerd's dialer
    polls a missing path every 10 ms, so it would otherwise catch the instant between bind
    and listen, get ECONNREFUSED and put the proxy connection in gRPC's backoff (calls
    fail UNAVAILABLE for up to ~3 s)."""
    path = Path(socket_path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket() or path.is_symlink():
        path.unlink()
    _remove_stale_staging(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(staging)) >= _SUN_PATH_MAX:
        staging = path  # no room for a longer name: bind in place
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshotter"))
    server.add_generic_rpc_handlers((handler(snapshotter),))
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{staging}") == 0:
            raise OSError(f"cannot listen on {staging}")
        server.start()
    finally:
        os.umask(old)
    if staging != path:
        os.rename(staging, path)
    _OURS[str(path)] = os.stat(path).st_ino
    log.info("snapshotter listening on %s", path)
    return server


#: The inode of the socket each path names while this process serves it: only that file is
#: ever removed, never a successor's socket that took the path meanwhile.
_OURS: dict[str, int] = {}


def unlink_socket(socket_path: str | Path) -> None:
    """Remove the socket `serve` put at `socket_path`, if the path still names it."""
    path = Path(socket_path).absolute()
    ino = _OURS.pop(str(path), None)
    try:
        if ino is not None and os.stat(path).st_ino == ino:
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_stale_staging(path: Path) -> None:
    """Remove the staging sockets (`.NAME.PID`) a snapshotter that died between bind and
    rename left next to `path`, except those of processes still alive."""
    for other in path.parent.glob(f".{path.name}.*"):
        pid = other.name.rpartition(".")[2]
        if not pid.isdigit() or not other.is_socket():
            continue
        if int(pid) != os.getpid() and Path(f"/proc/{pid}").exists():
            continue  # another snapshotter starting on this path right now
        other.unlink(missing_ok=True)


def shutdown(server: grpc.Server, socket_path: str | Path, grace: float | None) -> None:
    """Stop serving: first remove the socket's path, so a containerd that redials meanwhile
    finds no file (and polls until a new snapshotter's socket appears) rather than a socket
    that refuses (which would put it in gRPC's backoff); then let calls under way finish
    for up to `grace` seconds."""
    unlink_socket(socket_path)
    server.stop(grace).wait()
