"""The blocking control client (p2pfs.control.client) against a fake daemon: a unix
socket on a thread that answers badly on purpose, named by the same xattr a mount root
carries. Every bad answer is a P2PFSError (one
line), never a bare OSError or JSON error; and the client imports no trio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from p2pfs.control import client
from p2pfs.errors import ConfigError, P2PFSError, ProtocolError


class FakeDaemon:
    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.answer = answer  # None: say nothing, hold the connection
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            if self.answer is None:
                self.held.append(conn)
                continue
            self.reply(conn)
            conn.close()

    def reply(self, conn: socket.socket) -> None:
        conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def mount_like(tmp_path):
    """A plain directory carrying the control-socket xattr, as a mount root does, that
    names a fake daemon's socket."""
    made: list[FakeDaemon] = []

    def make(answer: bytes | None) -> Path:
        root = tmp_path / f"mnt{len(made)}"
        root.mkdir()
        sock = tmp_path / f"ctl{len(made)}.sock"
        made.append(FakeDaemon(sock, answer))
        os.setxattr(root, client.CONTROL_XATTR, str(sock).encode())
        return root

    yield make
    for d in made:
        d.close()


def test_reply_lines_are_yielded_in_order(mount_like):
    mnt = mount_like(b'{"done": 1, "total": 2}\n{"ok": true, "done": 2}\n')
    assert list(client.request(mnt, {"op": "prefetch"})) == [
        {"done": 1, "total": 2}, {"ok": True, "done": 2}]


@pytest.mark.parametrize("answer", [b"garbage\n", b"[1, 2]\n", b'{"ok": tr', b"\xff\n"])
def test_a_garbled_reply_is_a_protocol_error(mount_like, answer):
    with pytest.raises(ProtocolError, match="garbled reply"):
        list(client.request(mount_like(answer), {"op": "status"}))


def test_a_silent_daemon_is_a_p2pfs_error_after_the_timeout(mount_like):
    with pytest.raises(P2PFSError, match="sent nothing for 0.3 s"):
        list(client.request(mount_like(None), {"op": "status"}, timeout=0.3))


def test_no_daemon_is_a_config_error(tmp_path):
    os.setxattr(tmp_path, client.CONTROL_XATTR, str(tmp_path / "none.sock").encode())
    with pytest.raises(ConfigError, match="cannot reach"):
        list(client.request(tmp_path, {"op": "status"}))
    os.removexattr(tmp_path, client.CONTROL_XATTR)
    with pytest.raises(ConfigError, match="not a running p2pfs mount"):
        list(client.request(tmp_path, {"op": "status"}))


def test_the_clients_import_no_trio():
    code = ("import sys, p2pfs.control, p2pfs.control.client, p2pfs.fill, gpuload._p2pfs; "
            "print('trio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


class FdDaemon(FakeDaemon):
    """Answers one line with a descriptor attached."""

    def __init__(self, path: Path, answer: bytes, fd: int) -> None:
        self.fd = fd
        super().__init__(path, answer)

    def reply(self, conn: socket.socket) -> None:
        import array
        conn.sendmsg([self.answer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [self.fd]))])


def _fd_mount(tmp_path, answer: bytes, fd: int) -> tuple[Path, FdDaemon]:
    root = tmp_path / "mnt"
    root.mkdir()
    sock = tmp_path / "ctl.sock"
    daemon = FdDaemon(sock, answer, fd)
    os.setxattr(root, client.CONTROL_XATTR, str(sock).encode())
    return root, daemon


def test_open_local_takes_the_descriptor_of_the_local_copy(tmp_path):
    copy = tmp_path / "copy"
    copy.write_bytes(b"0123456789")
    fd = os.open(copy, os.O_RDONLY)
    root, daemon = _fd_mount(tmp_path, b'{"ok": true, "size": 10}\n', fd)
    try:
        got = client.open_local(root, mountpoint=root)
        assert got is not None and os.pread(got, 20, 0) == b"0123456789"
        os.close(got)
    finally:
        daemon.close()
        os.close(fd)


def _fds_of(fd: int) -> list[int]:
    """This process's descriptors that refer to the same open object as `fd`."""
    want = os.fstat(fd)
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            out.append(int(name))
    return sorted(out)


@pytest.mark.parametrize("what", ["wrong-size", "pipe"])
def test_open_local_refuses_a_descriptor_that_is_not_the_file(tmp_path, what):
    if what == "pipe":
        r, w = os.pipe()
        fd, extra = r, [w]
    else:
        (tmp_path / "short").write_bytes(b"abc")
        fd, extra = os.open(tmp_path / "short", os.O_RDONLY), []
    root, daemon = _fd_mount(tmp_path, b'{"ok": true, "size": 10}\n', fd)
    try:
        mine = sorted([fd, *extra])  # a pipe's two ends are one inode
        assert _fds_of(fd) == mine
        with pytest.raises(ProtocolError, match="not the file's local copy"):
            client.open_local(root, mountpoint=root)
        # The received copy was closed: only the sender's own descriptors are left.
        # (Counted by identity: the fake daemon's thread may still hold its connection.)
        assert _fds_of(fd) == mine
    finally:
        daemon.close()
        for d in [fd, *extra]:
            os.close(d)


def test_open_local_not_local_is_none_and_refusals_raise(mount_like):
    root = mount_like(b'{"ok": false, "code": "not_local", "error": "x"}\n')
    assert client.open_local(root, mountpoint=root) is None
    root = mount_like(b'{"ok": false, "code": "permission_denied", "error": "permission denied: uid 5"}\n')
    with pytest.raises(P2PFSError, match="permission denied"):
        client.open_local(root, mountpoint=root)
