"""The control socket: status, metrics and prefetch requests from clients (CLI, gpuload).

Wire protocol (docs/FORMAT.md): a unix stream socket whose path the mount root exposes as
the xattr `user.p2pfs.control`. The client sends one JSON object on one line; the server
answers with JSON lines and closes. `prefetch` streams `{"done": n, "total": n}` progress
lines and ends with `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

`fill` is a session on one connection: the first line carries, as SCM_RIGHTS ancillary
data, a memfd sealed against shrinking (the client's memory); then the client sends
`{"id", "offset", "length", "at"}` lines and the daemon writes file bytes
[offset, offset + length) at `at` of that memory, answering `{"id", "ok"}` per request, in
completion order. Chunks fetched from the origin are received straight into the client's
memory, verified and written to the disk cache from there: the file's bytes cross user
space once, and not through FUSE (gpuload loads this way).

The server half runs in the daemon's nursery; the client half is plain blocking sockets,
so any program (gpuload's threads, shell tools via socat) can use it.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

from .chunkstore import ChunkStore
from .errors import ConfigError, P2PFSError
from .plan import ChunkLoc, chunk_span
from .tree import Node, Tree

log = logging.getLogger("p2pfs.control")
CONTROL_XATTR = "user.p2pfs.control"
MAX_REQUEST = 64 * 1024
MAX_FDS = 4            # file descriptors accepted with one message (the rest are closed)
FILL_INFLIGHT = 64     # fill requests of one session served at once (more wait unread)


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
        lines = _Lines(stream)
        async with stream:
            try:
                await self._dispatch(stream, lines)
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
            finally:
                lines.close_fds()

    async def _dispatch(self, stream: trio.SocketStream, lines: "_Lines") -> None:
        req = await lines.first()
        op = req.get("op")
        if op == "status":
            await _send(stream, {"ok": True, **self.status()})
        elif op == "metrics":
            await _send(stream, {"ok": True, "text": self.metrics_text()})
        elif op == "prefetch":
            await self._prefetch(stream, req)
        elif op == "fill":
            await self._fill(stream, lines, req)
        else:
            await _send(stream, {"ok": False, "error": f"unknown op {op!r}"})

    async def _fill(self, stream: trio.SocketStream, lines: "_Lines", req: dict[str, Any]) -> None:
        path = str(req.get("path", "")).strip("/")
        node = self.tree.lookup_path(path)
        if node is None or node.entry is None or node.entry.type != "file":
            raise ValueError(f"not a regular file in the mount: {path!r}")
        entry = node.entry
        memory = _map_client_memory(lines.fds)
        size = len(memory)
        view = memoryview(memory)
        metrics = self.store.metrics
        send, recv = trio.open_memory_channel[dict[str, Any]](FILL_INFLIGHT)
        slots = trio.Semaphore(FILL_INFLIGHT)

        async def sender() -> None:
            gone = False
            async with recv:
                async for msg in recv:
                    if not gone:
                        try:
                            await _send(stream, msg)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            gone = True  # keep draining: the fills still finish

        async def one(writes: trio.Nursery, rid: Any, offset: int, length: int, at: int) -> None:
            try:
                await self._fill_range(node, view[at:at + length], offset, writes)
                reply: dict[str, Any] = {"id": rid, "ok": True}
                metrics.fill_bytes += length
            except (P2PFSError, ValueError) as exc:
                reply = {"id": rid, "ok": False, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a bug of ours: log it, answer, go on
                log.exception("fill of %s failed", path)
                reply = {"id": rid, "ok": False, "error": f"internal error: {exc!r}"}
            metrics.fill_requests += 1
            try:
                await send.send(reply)
            finally:
                # Only now: a client that sends without reading replies stalls itself,
                # instead of piling up finished requests here.
                slots.release()

        try:
            await _send(stream, {"ok": True, "size": entry.size,
                                 "chunk_size": entry.chunks[0].size if entry.chunks else 0})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                async with send:
                    async with trio.open_nursery() as fills:
                        # Until the client hangs up; fills under way then still finish (bounded
                        # by the read timeout), so no flight another reader waits on is cut.
                        # Their deferred disk writes run in this nursery too: the memory
                        # stays mapped until the last one is done.
                        while True:
                            try:
                                r = await lines.next()
                            except ValueError as exc:  # garbage: answer, stop reading
                                await send.send({"ok": False, "error": str(exc)})
                                break
                            if r is None:
                                break
                            try:
                                args = _fill_request(r, entry.size, size)
                            except ValueError as exc:
                                await send.send({"id": r.get("id"), "ok": False, "error": str(exc)})
                                continue
                            await slots.acquire()
                            fills.start_soon(one, fills, *args)
        finally:
            try:
                view.release()
                memory.close()
            except BufferError:
                pass  # a view is still referenced somewhere; the map goes with it

    async def _fill_range(self, node: Node, dest: memoryview, offset: int,
                          writes: trio.Nursery) -> None:
        """File bytes [offset, offset + len(dest)) into `dest`: whole chunks through the
        store's zero-copy fill, the partial chunks at either end copied from `get`."""
        entry = node.entry
        assert entry is not None
        end = offset + len(dest)
        span = chunk_span(entry, offset, len(dest))
        full = [i for i in span
                if entry.starts[i] >= offset and entry.starts[i] + entry.chunks[i].size <= end]
        for i in span:
            if full and full[0] <= i <= full[-1]:
                continue
            c0 = entry.starts[i]
            (data,) = await self.store.get(node.locs(range(i, i + 1)))
            lo, hi = max(offset, c0), min(end, c0 + entry.chunks[i].size)
            part = dest[lo - offset:hi - offset]
            await trio.to_thread.run_sync(part.__setitem__, slice(None),
                                          memoryview(data)[lo - c0:hi - c0])
        if full:
            lo = entry.starts[full[0]] - offset
            hi = entry.starts[full[-1]] + entry.chunks[full[-1]].size - offset
            await self.store.fill(node.locs(range(full[0], full[-1] + 1)), dest[lo:hi],
                                  writes=writes)

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


class _Lines:
    """JSON request lines from one client, with the file descriptors it passed
    (SCM_RIGHTS); we own those and close them with the connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sock = stream.socket
        self.buf = b""
        self.fds: list[int] = []
        self.eof = False

    async def _more(self) -> None:
        data, ancdata, _flags, _addr = await self.sock.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            self.eof = True
        self.buf += data

    async def next(self) -> dict[str, Any] | None:
        """The next request, or None once the client has hung up."""
        while b"\n" not in self.buf and not self.eof:
            if len(self.buf) > MAX_REQUEST:
                raise ValueError("request too long")
            await self._more()
        if not self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return _parse(line)

    async def first(self) -> dict[str, Any]:
        return await self.next() or {}

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line or b"{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"request is not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object")
    return req


def _fill_request(r: dict[str, Any], file_size: int, memory_size: int) -> tuple[Any, int, int, int]:
    try:
        rid, offset, length, at = r["id"], int(r["offset"]), int(r["length"]), int(r["at"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"fill request needs integer id, offset, length, at: {r!r}") from None
    if min(offset, length, at) < 0 or offset + length > file_size or at + length > memory_size:
        raise ValueError(f"fill request out of bounds: bytes {offset}+{length} of a "
                         f"{file_size}-byte file at {at} of {memory_size} bytes of memory")
    return rid, offset, length, at


def _map_client_memory(fds: list[int]) -> mmap.mmap:
    """Map the memory a fill client passed. It must be a memfd sealed against shrinking:
    if the client could truncate it under us, our writes would fault (SIGBUS) and end the
    daemon."""
    if len(fds) != 1:
        raise ValueError(f"fill needs exactly one file descriptor (SCM_RIGHTS), got {len(fds)}")
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError("fill memory must be a memfd sealed with F_SEAL_SHRINK "
                         "(memfd_create(MFD_ALLOW_SEALING), ftruncate, F_ADD_SEALS)")
    size = os.fstat(fd).st_size
    if size == 0:
        raise ValueError("fill memory is empty")
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


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
