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

Plain blocking sockets and one receiver thread, so gpuload's reader threads can use it
without an event loop. Errors: `FillError` (a request failed, the daemon went away or went
silent for `timeout` seconds) and `ConfigError` (not a p2pfs mount, no daemon, a daemon
without `fill`).
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

from .control import control_socket, find_mount, mount_relative
from .errors import ConfigError, P2PFSError


class FillError(P2PFSError):
    """A fill request failed, or the daemon stopped answering."""


class FillClient:
    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.path = Path(path)
        mnt = find_mount(self.path)
        if mnt is None:
            raise ConfigError(f"{path} is not on a p2pfs mount")
        st = os.stat(self.path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        self.size = st.st_size
        if self.size == 0:
            raise ConfigError(f"{path} is empty: nothing to fill")
        self._fd = os.memfd_create("p2pfs-fill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._sock: socket.socket | None = None
        try:
            os.ftruncate(self._fd, self.size)
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.memory = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(control_socket(mnt))
            except OSError as exc:
                raise ConfigError(f"cannot reach the p2pfs daemon of {mnt}: {exc}") from None
            req = {"op": "fill", "path": mount_relative(self.path, mnt)}
            socket.send_fds(self._sock, [json.dumps(req).encode() + b"\n"], [self._fd])
            self._buf = b""
            hello = self._read()
            if hello is None or not hello.get("ok"):
                why = "no answer" if hello is None else hello.get("error", hello)
                raise ConfigError(f"p2pfs daemon of {mnt} cannot fill {path}: {why}")
        except BaseException:
            self._close_transport()
            raise
        self.chunk_size = int(hello.get("chunk_size") or 0)
        self._lock = threading.Lock()        # guards the tables below (never held while sending)
        self._send_lock = threading.Lock()   # one request line at a time on the socket
        self._next_id = 0
        self._waiting: dict[int, list[Any]] = {}  # id -> [Event, reply]
        self._broken: str | None = None
        self._thread = threading.Thread(target=self._receive, name="p2pfs-fill", daemon=True)
        self._thread.start()

    def __enter__(self) -> "FillClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fill(self, offset: int, length: int, at: int | None = None) -> None:
        """Have the daemon write file bytes [offset, offset + length) at `at` (default:
        `offset`) of `memory`; return when they are there and verified."""
        done = threading.Event()
        slot: list[Any] = [done, None]
        with self._lock:
            if self._broken is not None:
                raise FillError(f"{self.path}: {self._broken}")
            rid = self._next_id
            self._next_id += 1
            self._waiting[rid] = slot
        msg = {"id": rid, "offset": offset, "length": length, "at": offset if at is None else at}
        try:
            # The daemon stops reading when it has enough requests under way; the receiver
            # must keep taking replies meanwhile, so it never waits for this lock.
            with self._send_lock:
                assert self._sock is not None
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            with self._lock:
                self._waiting.pop(rid, None)
            raise FillError(f"{self.path}: cannot send to the p2pfs daemon: {exc}") from None
        done.wait()
        reply = slot[1]
        if not reply.get("ok"):
            raise FillError(f"{self.path}: bytes {offset}+{length}: "
                            f"{reply.get('error', 'failed')}")

    def close(self) -> None:
        """End the session (the memory stays ours, mapped, until `memory.close()`)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if getattr(self, "_thread", None) is not None:
            self._thread.join()
        self._close_transport()

    # -- internals ----------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        """The next reply line, or None at EOF. A socket timeout leaves the buffer intact
        (unlike a makefile() reader), so the receiver can go on waiting."""
        assert self._sock is not None
        while b"\n" not in self._buf:
            data = self._sock.recv(65536)
            if not data:
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _receive(self) -> None:
        why = "the p2pfs daemon closed the connection"
        try:
            while True:
                try:
                    msg = self._read()
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
                        break
                    continue
                slot[1] = msg
                slot[0].set()
        except (OSError, ValueError) as exc:
            why = f"connection to the p2pfs daemon failed: {exc}"
        with self._lock:
            self._broken = why
            waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[1] = {"ok": False, "error": why}
            slot[0].set()

    def _close_transport(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
