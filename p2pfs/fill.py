"""Client of the daemon's `fill` session: the daemon writes a file's bytes into our memory.

    with FillClient("/mnt/models/llama/model.safetensors") as fc:
        fc.fill(0, fc.size)        # blocking and thread-safe: N threads keep N requests going
        data = fc.memory           # an mmap of the file's size, ours after close()

The memory is a memfd sealed against shrinking and growing (the daemon refuses anything
else: a file we could truncate under it would fault its writes), passed to the daemon with
SCM_RIGHTS on the control socket. Chunks the daemon fetches from the origin are received
straight into this memory, verified there and written to its disk cache from there; disk
hits are read into it with O_DIRECT. Compared with reading through FUSE that saves the
daemon's reply copy, the kernel's page-cache copy and our read copy, and every FUSE round
trip. Wire format: docs/FORMAT.md ("Control socket").

The daemon closes a session that has had nothing to do for its fill idle timeout; the next
`fill` then opens a new one on the same memory (requests are idempotent: one caught by the
close is sent again), so a client may keep a FillClient as long as it likes.

Plain blocking sockets and one receiver thread per session, so gpuload's reader threads
can use it without an event loop. Errors: `FillError` (a request failed, the daemon went
away or went silent for `timeout` seconds) and `ConfigError` (not a p2pfs mount, no
daemon, a daemon without `fill`, or one that refused the session).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from .control.client import connect, control_socket, find_mount, mount_relative
from .errors import ConfigError, P2PFSError

TIMEOUT_CODE = "timeout"  # the daemon's error code when it ends an idle session


class FillError(P2PFSError):
    """A fill request failed, or the daemon stopped answering."""


class SessionUnavailable(FillError):
    """A new session could not be opened (e.g. the daemon is at its connection limit):
    the memory is intact, and the caller may read the bytes through the mount instead."""


class FillClient:
    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        mnt = find_mount(self.path)
        if mnt is None:
            raise ConfigError(f"{path} is not on a p2pfs mount")
        st = os.stat(self.path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        self.size = st.st_size
        if self.size == 0:
            raise ConfigError(f"{path} is empty: nothing to fill")
        self._mnt = mnt
        self._socket_path = control_socket(mnt)
        self._rel = mount_relative(self.path, mnt)
        self._fd = os.memfd_create("p2pfs-fill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._open_lock = threading.Lock()  # one session opened at a time
        self._session: _Session | None = None
        try:
            os.ftruncate(self._fd, self.size)
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.memory = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._session = self._open()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.chunk_size = self._session.chunk_size

    def __enter__(self) -> "FillClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fill(self, offset: int, length: int, at: int | None = None) -> None:
        """Have the daemon write file bytes [offset, offset + length) at `at` (default:
        `offset`) of `memory`; return when they are there and verified."""
        msg = {"offset": offset, "length": length, "at": offset if at is None else at}
        for _attempt in range(2):
            session = self._current()
            reply = session.request(msg)
            if reply.get("ok"):
                return
            if reply.get("code") != TIMEOUT_CODE or not session.ended_idle:
                break  # a real failure; only a request caught by an idle close is resent
        raise FillError(f"{self.path}: bytes {offset}+{length}: {reply.get('error', 'failed')}")

    def release(self) -> None:
        """End the session but keep the memory and the right to fill it: the next `fill`
        opens a new session. A loader with many files holds a session only while it fills
        one (the daemon bounds connections, `control_max_connections`)."""
        with self._open_lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def close(self) -> None:
        """End the session (the memory stays ours, mapped, until `memory.close()`)."""
        with self._open_lock:
            if self._session is not None:
                self._session.close()
                self._session = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- internals ----------------------------------------------------------------------
    def _current(self) -> "_Session":
        """The open session; a new one if the daemon closed the last for idleness."""
        with self._open_lock:
            s = self._session
            if s is None and self._fd < 0:
                raise FillError(f"{self.path}: the fill client is closed")
            if s is None or s.ended_idle:
                if s is not None:
                    s.close()
                self._session = None
                try:
                    self._session = self._open()
                except ConfigError as exc:
                    raise SessionUnavailable(f"{self.path}: cannot open a fill session: {exc}") from None
                return self._session
            return s

    def _open(self) -> "_Session":
        try:
            sock = connect(self._socket_path, timeout=self.timeout)
        except ConfigError as exc:
            raise ConfigError(f"cannot reach the p2pfs daemon of {self._mnt}: {exc}") from None
        try:
            req = {"op": "fill", "path": self._rel}
            socket.send_fds(sock, [json.dumps(req).encode() + b"\n"], [self._fd])
            session = _Session(self.path, sock)
            hello = session.read()
        except (OSError, ValueError) as exc:
            sock.close()
            raise ConfigError(f"p2pfs daemon of {self._mnt} cannot fill {self.path}: {exc}") from None
        if hello is None or not hello.get("ok"):
            sock.close()
            why = "no answer" if hello is None else hello.get("error", hello)
            raise ConfigError(f"p2pfs daemon of {self._mnt} cannot fill {self.path}: {why}")
        session.chunk_size = int(hello.get("chunk_size") or 0)
        session.start()
        return session


class _Session:
    """One connection: requests out (under a send lock), replies matched by id on a
    receiver thread."""

    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self.sock: socket.socket | None = sock
        self.chunk_size = 0
        self._buf = b""
        self._lock = threading.Lock()        # guards the tables below (never held while sending)
        self._send_lock = threading.Lock()   # one request line at a time on the socket
        self._next_id = 0
        self._waiting: dict[int, list[Any]] = {}  # id -> [Event, reply]
        self.broken: str | None = None
        self.ended_idle = False  # the daemon closed us for idleness: a new session will do
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._receive, name="p2pfs-fill", daemon=True)
        self._thread.start()

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        done = threading.Event()
        slot: list[Any] = [done, None]
        with self._lock:
            if self.broken is not None:
                return {"ok": False, "error": self.broken,
                        "code": TIMEOUT_CODE if self.ended_idle else None}
            rid = self._next_id
            self._next_id += 1
            self._waiting[rid] = slot
        try:
            # The daemon stops reading when it has enough requests under way; the receiver
            # must keep taking replies meanwhile, so it never waits for this lock.
            with self._send_lock:
                assert self.sock is not None
                self.sock.sendall(json.dumps({"id": rid, **msg}).encode() + b"\n")
        except OSError as exc:
            with self._lock:
                self._waiting.pop(rid, None)
            # The daemon may have just closed us for idleness: its last line says so,
            # and the receiver is about to read it.
            if self._thread is not None:
                self._thread.join(5.0)
            return {"ok": False, "error": f"cannot send to the p2pfs daemon: {exc}",
                    "code": TIMEOUT_CODE if self.ended_idle else None}
        done.wait()
        return slot[1]

    def read(self) -> dict[str, Any] | None:
        """The next reply line, or None at EOF. A socket timeout leaves the buffer intact
        (unlike a makefile() reader), so the receiver can go on waiting."""
        assert self.sock is not None
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError(f"reply is not a JSON object: {line[:80]!r}")
        return msg

    def _receive(self) -> None:
        why = "the p2pfs daemon closed the connection"
        idle = False
        try:
            while True:
                try:
                    msg = self.read()
                except socket.timeout:
                    with self._lock:
                        if not self._waiting:
                            continue  # idle, not stuck
                    why = "the p2pfs daemon sent nothing for too long (stuck?)"
                    break
                if msg is None:
                    break
                with self._lock:
                    slot = self._waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
                if slot is None:
                    if not msg.get("ok", True):
                        why = f"the p2pfs daemon ended the session: {msg.get('error')}"
                        idle = msg.get("code") == TIMEOUT_CODE
                        break
                    continue
                slot[1] = msg
                slot[0].set()
        except (OSError, ValueError) as exc:
            why = f"connection to the p2pfs daemon failed: {exc}"
        with self._lock:
            self.broken = why
            self.ended_idle = idle
            waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[1] = {"ok": False, "error": why, "code": TIMEOUT_CODE if idle else None}
            slot[0].set()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
