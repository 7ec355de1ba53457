"""Control-socket resource limits and peer authorisation (issue 12, defect 8), on a real
mount: descriptors per message and per session, connections overall, idle timeouts of
connections and fill sessions, and SO_PEERCRED (root, the daemon's user, control_group).

Every client here passes only memfds or descriptors of local files, never a file of the
mount, so no scenario can wedge the daemon (that is test_control_fds.py's business)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import needs_fuse, p2pfs_cmd
from control_helpers import answers_status, ask, control_path, open_fds, read_reply
from p2pfs.fill import FillClient, FillError

pytestmark = needs_fuse
MiB = 1 << 20
NOBODY = 65534
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory):
    src = tmp_path_factory.mktemp("ctl-limits-src")
    (src / "weights.bin").write_bytes(random.Random(5).randbytes(3 * MiB + 7))
    url = f"s3://models/ctllim-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), url, endpoint=seaweed.endpoint)
    return url, src


def config(tmp_path: Path, **mount: object) -> list[str]:
    path = tmp_path / "p2pfs.toml"
    path.write_text("[mount]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in mount.items()))
    return ["--config", str(path)]


def memfd(size: int = MiB) -> int:
    fd = os.memfd_create("fill", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def fill_session(ctl: str, path: str = "weights.bin", *, timeout: float = 10) -> socket.socket:
    """A raw fill session past its hello (the caller closes it)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(ctl)
    fd = memfd()
    try:
        socket.send_fds(s, [json.dumps({"op": "fill", "path": path}).encode() + b"\n"], [fd])
    finally:
        os.close(fd)
    hello = read_reply(s)
    assert hello["ok"], hello
    return s


def test_descriptors_by_the_thousand_never_pile_up_in_the_daemon(model, seaweed, mount_factory):
    """Regression: a fill session kept every descriptor passed with every line until it
    ended (5000 lines x 4 fds reached the daemon's fd limit; accept failed, status timed
    out). Now the daemon takes one, with a session's first line; the kernel drops the rest."""
    url, _ = model
    m = mount_factory(url, seaweed.endpoint)
    ctl = control_path(m.path)
    baseline = open_fds(m.pid)
    junk = os.open("/dev/null", os.O_RDONLY)
    sessions: list[socket.socket] = []
    peak = baseline
    try:
        for _ in range(20):  # 20 sessions held open at once, 100 lines x 4 fds each
            s = fill_session(ctl)
            sessions.append(s)
            for i in range(100):
                try:
                    line = json.dumps({"id": i, "offset": 0, "length": 1, "at": 0}).encode()
                    socket.send_fds(s, [line + b"\n"], [junk] * 4)
                except (BrokenPipeError, ConnectionResetError):
                    break  # the daemon ended the session, as it should
            peak = max(peak, open_fds(m.pid))
        assert peak <= baseline + len(sessions) + 16, (baseline, peak)
        replies = []
        for s in sessions:
            s.settimeout(5)
            buf = b""
            try:
                while data := s.recv(65536):
                    buf += data
            except (ConnectionResetError, socket.timeout):
                pass
            lines = [json.loads(x) for x in buf.splitlines() if x.strip()]
            replies.append(lines[-1] if lines else {})
        # Four descriptors with a first line: one taken (and closed), three dropped.
        for _ in range(50):
            r = ask(ctl, {"op": "fill", "path": "weights.bin"}, fds=[junk] * 4)
            assert r["code"] == "bad_request" and "exactly 1" in r["error"], r
            peak = max(peak, open_fds(m.pid))
    finally:
        for s in sessions:
            s.close()
        os.close(junk)
    assert peak <= baseline + len(sessions) + 16, (baseline, peak)
    assert all(r.get("code") == "bad_request" and "first line" in r.get("error", "")
               for r in replies), replies[:3]
    assert answers_status(ctl, timeout=5)
    time.sleep(0.5)  # the closer thread is quick, not instant
    assert open_fds(m.pid) <= baseline + 4


def test_connections_beyond_the_limit_are_refused_and_idle_ones_closed(
        model, seaweed, mount_factory, tmp_path):
    url, _ = model
    m = mount_factory(url, seaweed.endpoint, *config(tmp_path, control_max_connections=8,
                                                      control_idle_timeout=2.0))
    ctl = control_path(m.path)
    idle = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(ctl)
            idle.append(s)
        time.sleep(0.3)  # let the daemon accept them all
        t0 = time.monotonic()
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(5)
            extra.connect(ctl)
            r = read_reply(extra)
            assert extra.recv(1) == b""  # and closed
        assert r["ok"] is False and r["code"] == "busy", r
        assert time.monotonic() - t0 < 1.5
        # Silent connections are closed after control_idle_timeout, each with one line.
        for s in idle:
            r = read_reply(s)
            assert r["code"] == "timeout" and "no request within 2" in r["error"], r
            assert s.recv(1) == b""
        assert time.monotonic() - t0 < 2 + 3
    finally:
        for s in idle:
            s.close()
    assert answers_status(ctl, timeout=5)
    assert m.alive()


def test_an_idle_fill_session_is_closed_and_the_client_reopens_one(
        model, seaweed, mount_factory, tmp_path):
    url, src = model
    want = (src / "weights.bin").read_bytes()
    m = mount_factory(url, seaweed.endpoint, *config(tmp_path, control_fill_idle_timeout=1.5))
    ctl = control_path(m.path)
    s = fill_session(ctl)
    try:
        t0 = time.monotonic()
        r = read_reply(s)  # nothing sent: the daemon closes the session
        assert r["code"] == "timeout" and "idle" in r["error"], r
        assert 1.4 < time.monotonic() - t0 < 1.5 + 2
    finally:
        s.close()
    with FillClient(m.path / "weights.bin") as fc:
        fc.fill(0, MiB)
        time.sleep(2.5)  # the daemon closes this session meanwhile ...
        assert fc._session.ended_idle
        fc.fill(MiB, fc.size - MiB)  # ... and the client opens another on the same memory
        assert fc.memory[:] == want
    assert answers_status(ctl)


def test_a_fill_in_flight_is_not_idle(tmp_path, mount_factory):
    """The fill idle timeout counts only while no request is in flight: a request stuck
    on a stalled store (SIGSTOP) for longer than that ends with the read timeout, not
    with an idle close."""
    import signal

    from p2pfs.seaweed import SeaweedServer

    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(random.Random(6).randbytes(2 * MiB))
    sw = SeaweedServer(tmp_path / "sw").start()
    stopped = False
    try:
        sw.create_bucket("idlefill")
        p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), "s3://idlefill/m",
                  endpoint=sw.endpoint)
        m = mount_factory("s3://idlefill/m", sw.endpoint, "--read-timeout", "4",
                          *config(tmp_path, control_fill_idle_timeout=1.0))
        with FillClient(m.path / "weights.bin") as fc:
            os.kill(sw.proc.pid, signal.SIGSTOP)
            stopped = True
            t0 = time.monotonic()
            with pytest.raises(FillError) as e:
                fc.fill(0, fc.size)
            took = time.monotonic() - t0
            # (ChunkStore.fill's own fetches are bounded by the S3 request timeout, 20 s,
            # not by read_timeout: the store's business, not the session's.)
            assert "session idle" not in str(e.value) and 3.5 < took < 30, (took, str(e.value))
            os.kill(sw.proc.pid, signal.SIGCONT)
            stopped = False
    finally:
        if stopped:
            os.kill(sw.proc.pid, signal.SIGCONT)
        sw.stop()


# -- who may connect ----------------------------------------------------------------------
NOBODY_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({"connect": "EACCES"}))
    raise SystemExit(0)
try:
    s.sendall(b'{"op": "status"}\n')
except OSError:
    pass  # refused before we spoke: the refusal is still there to read
buf = b""
while b"\n" not in buf:
    data = s.recv(65536)
    if not data:
        break
    buf += data
lines = buf.split(b"\n")
print(lines[0].decode() or "{}")
"""


def as_nobody(ctl: str, *, gid: int = NOBODY, groups: tuple[int, ...] = ()) -> dict:
    r = subprocess.run([PYTHON, "-I", "-c", NOBODY_CLIENT, ctl], user=NOBODY, group=gid,
                       extra_groups=list(groups), capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def open_dir():
    """A cache-dir parent other users can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="p2pfs-ctl-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_only_root_the_daemons_user_or_the_control_group_may_connect(
        model, seaweed, open_dir, mount_factory, tmp_path):
    """Regression: any local user who could reach the socket was served. Now SO_PEERCRED
    decides, whatever the socket file's mode, and the mode matches the setting."""
    url, _ = model
    m = mount_factory(url, seaweed.endpoint, cache_dir=open_dir / "a", mountpoint=tmp_path / "a")
    ctl = control_path(m.path)
    mode = stat.S_IMODE(os.stat(ctl).st_mode)
    os.chmod(ctl, 0o666)  # a socket file loosened by hand: the daemon still says no
    r = as_nobody(ctl)
    assert r["ok"] is False and r.get("code") == "permission_denied", r
    assert r["error"].startswith("permission denied: uid 65534")
    assert answers_status(ctl)  # root still may
    os.chmod(ctl, mode)
    assert mode == 0o600
    assert as_nobody(ctl) == {"connect": "EACCES"}

    g = 4242  # a gid without a name in /etc/group is still a group
    m2 = mount_factory(url, seaweed.endpoint, "--control-group", str(g),
                       cache_dir=open_dir / "b", mountpoint=tmp_path / "b")
    ctl2 = control_path(m2.path)
    st = os.stat(ctl2)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == g
    assert as_nobody(ctl2, groups=(g,))["ok"] is True       # a supplementary group
    assert as_nobody(ctl2, gid=g)["ok"] is True             # the primary group
    assert as_nobody(ctl2) == {"connect": "EACCES"}          # the file mode keeps others out
    os.chmod(ctl2, 0o666)
    r = as_nobody(ctl2)
    assert r["code"] == "permission_denied" and "group 4242" in r["error"], r

    (tmp_path / "c").mkdir()
    bad = p2pfs_cmd("mount", url, str(tmp_path / "c"), "--cache-dir", str(open_dir / "c"),
                    "--control-group", "no-such-group-p2pfs", endpoint=seaweed.endpoint,
                    check=False)
    assert bad.returncode == 1 and "no such group 'no-such-group-p2pfs'" in bad.stderr
    assert "Traceback" not in bad.stderr
