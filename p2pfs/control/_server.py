"""ControlServer: the daemon's end of the control socket (status, metrics, prefetch, fill,
open).

Per connection, in order: the peer's credentials (SO_PEERCRED, taken by the kernel at
connect) must be root, the daemon's own user or the configured group, else one
`permission_denied` line; at most `max_connections` are served at once, more get one
`busy` line; the request line must come within `idle_timeout`; then the op runs. Nothing a
client does ends the daemon: every exception stops in `_handle`, cancellation excepted.
Received file descriptors never meet a syscall on this (the trio) thread: `_fds`.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from ..errors import ConfigError, P2PFSError, ProtocolError
from ..plan import ChunkLoc
from ..tree import Node, Tree
from . import _wire
from ._fds import FdCloser, ancillary_space, unpack_fds
from ._fill import serve_fill

if TYPE_CHECKING:
    from ..store import ChunkStore

log = logging.getLogger("p2pfs.control")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python lacks the name
REFUSE_TIMEOUT = 1.0  # seconds we try to deliver a refusal before just closing


class Connection:
    """One client's socket: request lines in (with the descriptors that came with the
    first one), reply lines out, each send bounded by `send_timeout`."""

    def __init__(self, stream: trio.SocketStream, closer: FdCloser, *, send_timeout: float) -> None:
        self.stream = stream
        self.closer = closer
        self.send_timeout = send_timeout
        self.lines = _wire.LineBuffer()
        self.fds: list[int] = []
        self.fds_dropped = False  # the kernel discarded descriptors we made no room for
        self._taking = True

    async def next_line(self) -> bytes | None:
        """The next request line, or None once the client has hung up."""
        while True:
            line = self.lines.next_line()
            if line is not None or self.lines.eof:
                return line
            await self._recv()

    async def _recv(self) -> None:
        room = 0
        if self._taking and not self.closer.backlogged:
            room = _wire.MAX_FDS_PER_MESSAGE - len(self.fds)
        try:
            data, ancdata, flags, _ = await self.stream.socket.recvmsg(65536, ancillary_space(room))
        except OSError:  # reset: as good as a hang-up
            data, ancdata, flags = b"", [], 0
        fds = unpack_fds(ancdata)
        if self._taking:
            self.fds.extend(fds)
        else:
            self.closer.close_soon(fds)
        if flags & socket.MSG_CTRUNC:
            self.fds_dropped = True
        self.lines.feed(data)

    def take_fds(self) -> tuple[list[int], bool]:
        """The descriptors that came with the first line (now the caller's to close) and
        whether more were dropped; from now on the kernel discards any that come."""
        self._taking = False
        fds, self.fds = self.fds, []
        dropped, self.fds_dropped = self.fds_dropped, False
        return fds, dropped

    async def send(self, obj: dict[str, Any]) -> None:
        """One reply line; trio.BrokenResourceError if the client is gone or has not
        taken it within `send_timeout`."""
        with trio.move_on_after(self.send_timeout):
            try:
                await self.stream.send_all(_wire.encode(obj))
                return
            except (trio.ClosedResourceError, OSError) as exc:
                raise trio.BrokenResourceError(str(exc)) from None
        raise trio.BrokenResourceError(f"client read nothing for {self.send_timeout:g} s")

    async def send_fd(self, obj: dict[str, Any], fd: int) -> None:
        """One reply line with `fd` attached (SCM_RIGHTS). The line is small, so one
        sendmsg on the Unix socket takes it whole."""
        data = _wire.encode(obj)
        with trio.move_on_after(self.send_timeout):
            try:
                sent = await self.stream.socket.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
                if sent < len(data):
                    await self.stream.send_all(data[sent:])
                return
            except (trio.ClosedResourceError, OSError) as exc:
                raise trio.BrokenResourceError(str(exc)) from None
        raise trio.BrokenResourceError(f"client read nothing for {self.send_timeout:g} s")

    def close(self) -> None:
        self.closer.close_soon(self.fds)
        self.fds = []


def files_under(tree: Tree, node: Node) -> list[Node]:
    """Regular files at or below `node`, in path order (the order a loader reads them)."""
    if node.children is None:
        return [node] if node.entry is not None and node.entry.type == "file" else []
    out: list[Node] = []
    for name in sorted(node.children):
        out.extend(files_under(tree, tree.nodes[node.children[name]]))
    return out


def resolve_group(group: str | None) -> tuple[int, str] | None:
    """(gid, name) of a group given by name or number; None for no group."""
    if not group:
        return None
    try:
        if group.isdigit():
            gid = int(group)
            try:
                return gid, grp.getgrgid(gid).gr_name
            except KeyError:
                return gid, group  # a gid without a name is still a gid
        return grp.getgrnam(group).gr_gid, group
    except KeyError:
        raise ConfigError(f"[mount] control_group: no such group {group!r}") from None


def peer_of(sock: trio.socket.SocketType, *, with_groups: bool) -> _wire.Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    groups: tuple[int, ...] = ()
    if with_groups:
        try:  # up to 256 supplementary groups (Python caps the buffer at 1 KiB)
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
            groups = struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
        except OSError:
            pass  # ERANGE (more groups) or an old kernel: the primary group still counts
    return _wire.Peer(pid, uid, gid, groups)


class ControlServer:
    def __init__(self, path: Path, *, tree: Tree, store: "ChunkStore",
                 status: Callable[[], dict[str, Any]], metrics_text: Callable[[], str],
                 limits: _wire.ControlLimits | None = None, group: str | None = None,
                 refresh: Callable[[tuple[str, ...] | None], Awaitable[dict[str, Any]]] | None = None
                 ) -> None:
        self.path = Path(path)
        self.refresh = refresh
        self.tree = tree
        self.store = store
        self.status = status
        self.metrics_text = metrics_text
        self.limits = limits or _wire.ControlLimits()
        self.group = resolve_group(group)
        self.active = 0  # connections being served (or refused) now
        self._closer = FdCloser(backlog=self.limits.max_connections)
        self._warned: dict[str, float] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await self._bind(sock)
        sock.listen(min(self.limits.max_connections, 128))
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._closer.run)
                task_status.started()
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _bind(self, sock: trio.socket.SocketType) -> None:
        """Bind under a temporary name, set mode and group, then rename into place: no
        moment in which the socket file admits more than it should."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        for p in (tmp, self.path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        await sock.bind(str(tmp))
        try:
            if self.group is None:
                os.chmod(tmp, 0o600)
            else:
                os.chown(tmp, -1, self.group[0])
                os.chmod(tmp, 0o660)
            os.rename(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"control socket {self.path}: {exc.strerror or exc}") from None

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.active += 1
        conn = Connection(stream, self._closer, send_timeout=self.limits.send_timeout)
        try:
            async with stream:
                await self._serve(conn)
        finally:
            self.active -= 1
            conn.close()

    async def _serve(self, conn: Connection) -> None:
        peer = peer_of(conn.stream.socket, with_groups=self.group is not None)
        if not _wire.may_connect(peer, daemon_uid=os.geteuid(),
                                 group=self.group[0] if self.group else None):
            self._warn("denied", "control socket: refused uid %d (pid %d): not root, the "
                       "daemon's user or in control_group", peer.uid, peer.pid)
            await _refuse(conn, _wire.denied(peer, self.group[1] if self.group else None))
            return
        if self.active > self.limits.max_connections:
            self._warn("busy", "control socket: %d connections, refusing more (max_connections)",
                       self.active - 1)
            await _refuse(conn, _wire.error(
                f"busy: the daemon serves {self.limits.max_connections} control connections "
                f"already; try again", _wire.BUSY))
            return
        try:
            await self._dispatch(conn, peer)
        except BaseException as exc:  # noqa: BLE001 - sorted below; cancellation re-raised
            exc = _unwrap(exc)
            if isinstance(exc, (trio.Cancelled, KeyboardInterrupt, SystemExit)):
                raise
            if _is_disconnect(exc):
                return  # the client went away; a prefetch it started is cancelled with it
            if isinstance(exc, ProtocolError):
                reply = _wire.error(str(exc), _wire.BAD_REQUEST)
            elif isinstance(exc, P2PFSError):
                reply = _wire.error(str(exc), _wire.FAILED)
            elif isinstance(exc, Exception):
                log.error("control request failed", exc_info=exc)
                reply = _wire.error(f"internal error: {exc!r}", _wire.INTERNAL)
            else:
                raise
            await _refuse(conn, reply)

    async def _dispatch(self, conn: Connection, peer: _wire.Peer) -> None:
        with trio.move_on_after(self.limits.idle_timeout) as waited:
            line = await conn.next_line()
        fds, dropped = conn.take_fds()
        fill: tuple[str, Node, int] | None = None
        try:  # until an op takes them, the descriptors are ours to close
            if waited.cancelled_caught:
                await _refuse(conn, _wire.error(
                    f"no request within {self.limits.idle_timeout:g} s", _wire.TIMEOUT))
                return
            if line is None:
                return
            req = _wire.parse_request(line)
            op = _wire.op_of(req)
            _wire.check_fds(op, len(fds), dropped)
            if op == "fill":
                path = _wire.path_of(req)
                node = self.tree.lookup_path(path)
                if node is None or node.entry is None or node.entry.type != "file":
                    raise ProtocolError(f"not a regular file in the mount: {path!r}")
                fill = (path, node, fds.pop())  # serve_fill closes it
        finally:
            self._closer.close_soon(fds)
        if fill is not None:
            await serve_fill(conn, self.store, *fill, self.limits)
        elif op == "status":
            await conn.send({"ok": True, **self.status()})
        elif op == "metrics":
            await conn.send({"ok": True, "text": self.metrics_text()})
        elif op == "open":
            await self._open(conn, _wire.path_of(req), peer)
        elif op == "refresh":
            paths = _wire.parse_refresh(req)
            if self.refresh is None:
                raise ProtocolError("this daemon cannot refresh its tree")
            await conn.send({"ok": True, **await self.refresh(paths)})
        else:
            await self._prefetch(conn, _wire.parse_prefetch(req))

    async def _prefetch(self, conn: Connection, req: _wire.PrefetchRequest) -> None:
        node = self.tree.lookup_path(req.path)
        if node is None:
            raise ProtocolError(f"no such path in the mount: {req.path!r}")
        locs: list[ChunkLoc] = []
        seen: set[str] = set()
        for f in files_under(self.tree, node):
            assert f.entry is not None
            end = f.entry.size if req.length is None else min(f.entry.size, req.offset + req.length)
            if not f.entry.chunks or end <= req.offset:
                continue
            span = range(f.entry.chunk_index(req.offset), f.entry.chunk_index(end - 1) + 1)
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
                await conn.send({"done": done, "total": total})

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report)
                await self.store.warm(locs, progress)
                nursery.cancel_scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - unwrapped, then re-raised unless ours
            inner = _unwrap(exc)
            if isinstance(inner, P2PFSError) and not isinstance(inner, ProtocolError):
                await conn.send(_wire.error(str(inner), _wire.FAILED, done=done, total=total))
                return
            raise
        await conn.send({"ok": True, "done": total, "total": total, "chunks": len(locs),
                         "seconds": round(time.monotonic() - t0, 3)})

    async def _open(self, conn: Connection, path: str, peer: _wire.Peer) -> None:
        """Hand the client a read-only descriptor of the file's local copy, if it is whole
        on disk and sealed (DiskCache.seal): the client maps a local file, no FUSE in the
        way. Otherwise a NOT_LOCAL error: the client reads another way, e.g. `fill`."""
        node = self.tree.lookup_path(path)
        if node is None or node.entry is None or node.entry.type != "file":
            raise ProtocolError(f"not a regular file in the mount: {path!r}")
        e = node.entry
        if not peer.groups and peer.uid != 0:
            peer = peer_of(conn.stream.socket, with_groups=True)
        if not _wire.may_read(peer, uid=e.uid, gid=e.gid, mode=e.mode):
            await conn.send(_wire.error(f"permission denied: uid {peer.uid} may not read "
                                        f"{path!r} on the mount", _wire.PERMISSION_DENIED))
            return
        fd = None if not e.chunks else await self.store.open_local(node.file_id)
        if fd is None:
            await conn.send(_wire.error(
                f"{path!r} is not whole on local disk; read it through the mount or fill",
                _wire.NOT_LOCAL, size=e.size))
            return
        try:
            await conn.send_fd({"ok": True, "size": e.size}, fd)
            self.store.metrics.local_opens += 1
            self.store.metrics.local_open_bytes += e.size
        finally:
            os.close(fd)  # a descriptor of our own local file: closing it cannot block

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """At most one line per kind every 10 s: a client hammering us must not fill the log."""
        now = time.monotonic()
        if now - self._warned.get(kind, -10.0) >= 10.0:
            self._warned[kind] = now
            log.warning(msg, *args)


async def _refuse(conn: Connection, reply: dict[str, Any]) -> None:
    """Send one error line if the client takes it promptly; the connection closes anyway."""
    with trio.move_on_after(REFUSE_TIMEOUT):
        try:
            await conn.send(reply)
        except trio.BrokenResourceError:
            pass


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _is_disconnect(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError,
                            BrokenPipeError, ConnectionResetError))
