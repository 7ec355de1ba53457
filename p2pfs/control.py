"""The control socket: status, metrics and prefetch requests from clients (CLI, gpuload).

Wire protocol (docs/FORMAT.md): a unix stream socket whose path the mount root exposes as
the xattr `user.p2pfs.control`. The client sends one JSON object on one line; the server
answers with JSON lines and closes. `prefetch` streams `{"done": n, "total": n}` progress
lines and ends with `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

The server half runs in the daemon's nursery; the client half is plain blocking sockets,
so any program (gpuload's threads, shell tools via socat) can use it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

from .chunkstore import ChunkStore
from .errors import ConfigError, P2PFSError
from .plan import ChunkLoc
from .tree import Node, Tree

log = logging.getLogger("p2pfs.control")
CONTROL_XATTR = "user.p2pfs.control"
MAX_REQUEST = 64 * 1024


def files_under(tree: Tree, node: Node) -> list[Node]:
    """Regular files at or below `node`, in path order (the order a loader reads them)."""
    if node.children is None:
        return [node] if node.entry is not None and node.entry.type == "file" else []
    out: list[Node] = []
    for name in sorted(node.children):
        out.extend(files_under(tree, tree.nodes[node.children[name]]))
    return out


class ControlServer:
    def __init__(self, path: Path, *, tree: Tree, store: ChunkStore,
                 status: Callable[[], dict[str, Any]], metrics_text: Callable[[], str]) -> None:
        self.path = Path(path)
        self.tree = tree
        self.store = store
        self.status = status
        self.metrics_text = metrics_text

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        await sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. Nothing a client does (garbage, hanging up mid-prefetch)
        may end the daemon: every exception stops here, cancellation excepted."""
        async with stream:
            try:
                await self._dispatch(stream)
            except Exception as exc:  # noqa: BLE001 - includes ExceptionGroups from nurseries
                if _is_disconnect(exc):
                    return  # the client went away; a prefetch it started is cancelled with it
                if not isinstance(exc, ValueError):
                    log.exception("control request failed")
                with trio.move_on_after(1):
                    try:
                        await _send(stream, {"ok": False, "error": str(exc)})
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    async def _dispatch(self, stream: trio.SocketStream) -> None:
        req = await _read_line(stream)
        op = req.get("op")
        if op == "status":
            await _send(stream, {"ok": True, **self.status()})
        elif op == "metrics":
            await _send(stream, {"ok": True, "text": self.metrics_text()})
        elif op == "prefetch":
            await self._prefetch(stream, req)
        else:
            await _send(stream, {"ok": False, "error": f"unknown op {op!r}"})

    async def _prefetch(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        path = str(req.get("path", "")).strip("/")
        node = self.tree.lookup_path(path)
        if node is None:
            raise ValueError(f"no such path in the mount: {path!r}")
        offset = int(req.get("offset") or 0)
        length = req.get("length")
        locs: list[ChunkLoc] = []
        seen: set[str] = set()
        for f in files_under(self.tree, node):
            assert f.entry is not None
            end = f.entry.size if length is None else min(f.entry.size, offset + int(length))
            if not f.entry.chunks or end <= offset:
                continue
            span = range(f.entry.chunk_index(offset), f.entry.chunk_index(end - 1) + 1)
            for loc in f.locs(span):
                if loc.digest not in seen:
                    seen.add(loc.digest)
                    locs.append(loc)
        total = sum(loc.ref.size for loc in locs)
        done = 0
        t0 = time.monotonic()

        def progress(n: int) -> None:
            nonlocal done
            done += n

        async def report() -> None:
            while True:
                await trio.sleep(0.25)
                await _send(stream, {"done": done, "total": total})

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report)
                await self.store.warm(locs, progress)
                nursery.cancel_scope.cancel()
        except P2PFSError as exc:
            await _send(stream, {"ok": False, "error": str(exc), "done": done, "total": total})
            return
        await _send(stream, {"ok": True, "done": total, "total": total, "chunks": len(locs),
                             "seconds": round(time.monotonic() - t0, 3)})


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError,
                            BrokenPipeError, ConnectionResetError))


async def _read_line(stream: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    while b"\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            break
        buf += data
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    try:
        req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object")
    return req


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


# -- client -------------------------------------------------------------------------------
def find_mount(path: str | os.PathLike[str]) -> Path | None:
    """The p2pfs mount that holds `path`, or None."""
    p = Path(os.path.realpath(path))
    for cand in (p, *p.parents):
        if os.path.ismount(cand):
            try:
                os.getxattr(cand, CONTROL_XATTR)
                return cand
            except OSError:
                return None
    return None


def mount_relative(path: str | os.PathLike[str], mountpoint: Path) -> str:
    """`path` as the control protocol names it: relative to the mount root, "" for the root."""
    rel = os.path.relpath(os.path.realpath(path), mountpoint)
    return "" if rel == "." else rel


def control_socket(mountpoint: str | os.PathLike[str]) -> str:
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not a running p2pfs mount ({exc.strerror})") from None


def request(mountpoint: str | os.PathLike[str], req: dict[str, Any], *,
            timeout: float | None = 30.0) -> Iterator[dict[str, Any]]:
    """Send one request to the daemon serving `mountpoint`; yield its reply lines."""
    path = control_socket(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as exc:
            raise ConfigError(f"cannot reach the p2pfs daemon at {path}: {exc}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            yield json.loads(line)


def prefetch(path: str | os.PathLike[str], *, offset: int = 0, length: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
    """Ask the daemon to make a file or directory under a p2pfs mount local; block until
    it is. Raises ConfigError if `path` is not on a p2pfs mount, P2PFSError on failure."""
    mnt = find_mount(path)
    if mnt is None:
        raise ConfigError(f"{path} is not on a p2pfs mount")
    rel = mount_relative(path, mnt)
    last: dict[str, Any] = {}
    for msg in request(mnt, {"op": "prefetch", "path": rel, "offset": offset, "length": length},
                       timeout=timeout):
        last = msg
        if progress and "done" in msg:
            progress(msg["done"], msg["total"])
    if not last.get("ok"):
        raise P2PFSError(f"prefetch of {path} failed: {last.get('error', 'no answer')}")
    return last
