"""File descriptors passed over the control socket (issue 12, defect 2), on a real mount.

close() of a file on a FUSE mount sends FLUSH to that mount's daemon. A daemon that closes
an fd of a file on its own mount on the thread that serves FUSE waits for an answer only
it could give: D state, SIGKILL ignored. Each scenario gets a fresh mount (the kernel stops
sending FLUSH once the daemon has answered one with ENOSYS, so a second scenario on the
same mount would prove nothing), passes an fd of a file on that mount from a subprocess
client, and asserts the daemon still answers `status` within seconds. If it does not,
`wedge_guard` aborts the FUSE connection so nothing stays blocked on this machine.
"""

from __future__ import annotations

import json
import random
import uuid

import pytest

from conftest import needs_fuse, p2pfs_cmd
from control_helpers import (answers_status, control_path, fd_client, fd_session_client,
                             reply_of, replies_of, wedge_guard)

pytestmark = needs_fuse
MiB = 1 << 20


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory):
    src = tmp_path_factory.mktemp("ctl-fds-src")
    (src / "weights.bin").write_bytes(random.Random(3).randbytes(3 * MiB + 5))
    (src / "small.txt").write_text("tiny")
    url = f"s3://models/ctlfds-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), url, endpoint=seaweed.endpoint)
    return url, src


@pytest.mark.parametrize("line", [
    {"op": "status"},
    {"op": "prefetch", "path": "small.txt"},
    {"op": "no-such-op"},
    b"not json",
], ids=["status", "prefetch", "unknown-op", "garbage"])
def test_an_fd_with_an_op_that_takes_none_is_refused_and_never_wedges(
        model, seaweed, mount_factory, line):
    url, src = model
    m = mount_factory(url, seaweed.endpoint)
    ctl = control_path(m.path)
    req = line.decode() if isinstance(line, bytes) else json.dumps(line)
    with wedge_guard(m.path) as procs:
        p = fd_client(procs, ctl, m.path / "weights.bin", req)
        reply = reply_of(p)
        assert answers_status(ctl, timeout=5), "daemon silent after closing a passed fd"
    assert reply["ok"] is False and reply["code"] == "bad_request", reply
    if not isinstance(line, bytes) and line["op"] != "no-such-op":
        assert "file descriptor" in reply["error"]
    assert m.alive()
    assert (m.path / "small.txt").read_text() == "tiny"


def test_fill_refuses_an_fd_of_a_file_on_the_mount_in_place_of_a_memfd(
        model, seaweed, mount_factory):
    url, src = model
    m = mount_factory(url, seaweed.endpoint)
    ctl = control_path(m.path)
    with wedge_guard(m.path) as procs:
        p = fd_client(procs, ctl, m.path / "weights.bin", '{"op": "fill", "path": "weights.bin"}')
        reply = reply_of(p)
        assert answers_status(ctl, timeout=5), "daemon silent after a fill was passed a FUSE file"
    assert reply["ok"] is False and reply["code"] == "bad_request"
    assert "memfd" in reply["error"]
    assert m.alive()


def test_an_fd_passed_after_a_fill_sessions_first_line_ends_the_session_and_never_wedges(
        model, seaweed, mount_factory):
    url, src = model
    m = mount_factory(url, seaweed.endpoint)
    ctl = control_path(m.path)
    with wedge_guard(m.path) as procs:
        p = fd_session_client(procs, ctl, m.path / "weights.bin", "small.txt")
        replies = replies_of(p)
        assert answers_status(ctl, timeout=5), "daemon silent after a fill session ended"
    hello, *rest = replies
    assert hello["ok"] is True and hello["size"] == 4
    assert rest and rest[-1]["ok"] is False and rest[-1]["code"] == "bad_request", rest
    assert "file descriptor" in rest[-1]["error"]
    assert all(r.get("id") != 1 or not r["ok"] for r in rest)  # the request with it is refused
    assert m.alive()
