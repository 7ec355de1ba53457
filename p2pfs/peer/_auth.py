"""The cluster token: HMAC-SHA256 signing and checking of peer requests (pure, no I/O but
`load_tokens`).

Every request carries the node id, a Unix timestamp and a MAC over (method, path, locator,
timestamp, node id). A server accepts a MAC made with any of its tokens (two during a
rotation) if the timestamp is within `window` seconds of its own clock. The token
authenticates; it does not encrypt. A request replayed within the window is accepted, which
is harmless: requests are idempotent reads of content-addressed data.

The signed message is a version tag followed by each field as `<byte length>:<UTF-8 bytes>`,
so no choice of field contents can make two different requests sign the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, P2PFSError

log = logging.getLogger("p2pfs.peer")

MIN_TOKEN_BYTES = 16
MAX_TOKENS = 2
_TAG = b"p2pfs-peer-v1"
_MAC_RE = re.compile(r"[0-9a-f]{64}")


class Unauthorized(P2PFSError):
    """A request whose MAC is missing, malformed, stale or wrong (answered 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_tokens(path: str | os.PathLike) -> tuple[bytes, ...]:
    """Read the token file: one token per line, the first one signs, a second one (the
    previous or next token during a rotation) is also accepted. Surrounding whitespace and
    blank lines are ignored."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cluster token file {path}: {exc.strerror or exc}") from exc
    tokens = tuple(line.strip() for line in raw.splitlines() if line.strip())
    if not tokens:
        raise ConfigError(f"cluster token file {path}: no token in it")
    if len(tokens) > MAX_TOKENS:
        raise ConfigError(f"cluster token file {path}: {len(tokens)} tokens, at most "
                          f"{MAX_TOKENS} (the current one, then the previous or next one)")
    for i, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_BYTES:
            raise ConfigError(f"cluster token file {path}: token {i} has {len(token)} "
                              f"bytes, needs at least {MIN_TOKEN_BYTES}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("cluster token file %s is readable by group or others (mode %o): "
                    "chmod 600 it", path, stat.S_IMODE(mode))
    return tokens


def _message(method: str, path: str, locator: str, ts: int, node: str) -> bytes:
    """The canonical bytes a MAC covers; raises ValueError on a field that is not text."""
    parts = [_TAG]
    for field in (method, path, locator, str(int(ts)), node):
        if not isinstance(field, str):
            raise ValueError(f"field {field!r} is not a str")
        data = field.encode("utf-8")  # UnicodeEncodeError (a ValueError) on lone surrogates
        parts.append(b"%d:%s" % (len(data), data))
    return b"\n".join(parts)


def sign(token: bytes, *, method: str, path: str, locator: str, ts: int, node: str) -> str:
    """The hex HMAC-SHA256 of a request's fields under `token`."""
    return hmac.new(token, _message(method, path, locator, ts, node), hashlib.sha256).hexdigest()


class Verifier:
    """Checks requests against the accepted tokens and the time window."""

    def __init__(self, tokens: Sequence[bytes], *, window: float = 30.0) -> None:
        if not tokens or not all(isinstance(t, bytes) and t for t in tokens):
            raise ValueError("Verifier needs at least one non-empty bytes token")
        if not window > 0:
            raise ValueError("window must be > 0")
        self._tokens = tuple(tokens)
        self.window = window

    def check(self, *, method: str, path: str, locator: str, ts: int, node: str, mac: str,
              now: float) -> None:
        """Return if the request is authentic and fresh, else raise Unauthorized."""
        if not mac:
            raise Unauthorized("missing mac")
        if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
            raise Unauthorized("malformed mac")
        if not node or not isinstance(node, str):
            raise Unauthorized("missing node id")
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise Unauthorized("malformed timestamp")
        if abs(now - ts) > self.window:
            raise Unauthorized(f"stale timestamp ({now - ts:+.0f} s off, window "
                               f"{self.window:g} s)")
        try:
            msg = _message(method, path, locator, ts, node)
        except ValueError:
            raise Unauthorized("malformed field") from None
        # Compare against every token, not stopping at the first match, so the time taken
        # says nothing about which token (or how much of a MAC) matched.
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(hmac.new(token, msg, hashlib.sha256).hexdigest(), mac)
        if not ok:
            raise Unauthorized("wrong mac")
