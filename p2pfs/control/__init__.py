"""The control socket: status, metrics, prefetch, refresh and fill requests from clients (the CLI,
gpuload, shell tools).

A unix stream socket whose path the mount root exposes as the xattr `user.p2pfs.control`.
A client sends one JSON object per line and reads JSON lines back; `fill` is a session of
many requests whose first line carries a sealed memfd (SCM_RIGHTS) for the daemon to write
file bytes into. Wire format, limits and error codes: docs/FORMAT.md ("Control socket").

    _wire.py    pure: framing, request parsing and validation, limits, error codes, who
                may connect; no I/O
    client.py   blocking client (find_mount, request, prefetch, refresh); imports no trio, so any
                program or thread can use it (p2pfs.fill.FillClient is the fill client)
    _server.py  ControlServer: accept, SO_PEERCRED, connection and idle limits, dispatch
    _fill.py    the daemon's side of a fill session
    _fds.py     received file descriptors: bounded, checked and closed off the trio thread

Only the client names are imported eagerly; `ControlServer` (and with it trio) loads on
first use.
"""

from __future__ import annotations

from typing import Any

from ._wire import ControlLimits
from .client import (CONTROL_XATTR, control_socket, find_mount, mount_relative, prefetch, refresh,
                     request)

__all__ = ["CONTROL_XATTR", "ControlLimits", "ControlServer", "control_socket", "find_mount",
           "mount_relative", "prefetch", "refresh", "request"]


def __getattr__(name: str) -> Any:
    if name == "ControlServer":
        from ._server import ControlServer

        return ControlServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
