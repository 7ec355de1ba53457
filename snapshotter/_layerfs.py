"""Remote layers: where a layer's tree lives on the p2pfs mount, and whether it answers.

The snapshotter never mounts anything itself: one long-lived p2pfs daemon mounts the
layers prefix (a killed FUSE daemon breaks running containers for good, so it is its own
service), and each converted layer is the directory `<mount>/<hex sha256 of its blob>`.

A dead FUSE daemon can make a stat hang (or, with cached attributes, succeed), so a
probe opens the directory (always a request to the daemon) in a thread that may be
abandoned: it either answers within `timeout` or the probe reports Unavailable. Once
`max_hung` probes have timed out and not returned yet, every probe fails at once instead
of piling up threads behind a dead mount; probes that answer in time may run in any
number at once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from ._errors import Unavailable

log = logging.getLogger("snapshotter.layers")

#: Labels that name a layer's blob digest: CRI's (disable_snapshot_annotations = false)
#: and those `ctr-remote image rpull` sends.
LAYER_DIGEST_LABELS = ("containerd.io/snapshot/cri.layer-digest",
                       "containerd.io/snapshot/remote/stargz.digest")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class RemoteLayers(Protocol):
    """What the snapshotter asks of the layer store (the lead's p2pfs-backed one extends this)."""

    def lookup(self, labels: Mapping[str, str]) -> str | None:
        """The layer's dir on the p2pfs mount, or None: pull it normally."""

    def check(self, lower_dirs: Sequence[str]) -> None:
        """Raise Unavailable unless every remote lower dir answers within a bounded time."""

    def committed(self, name: str, labels: Mapping[str, str], upper_dir: str) -> None:
        """A normally unpacked layer was committed (hook for convert-on-first-pull; must not block)."""

    def prepared(self, key: str, lower_dirs: Sequence[str]) -> None:
        """An active snapshot over remote lowers was prepared (hook for prefetch; must not block)."""


class NoRemoteLayers:
    """Every layer is pulled normally."""

    def lookup(self, labels: Mapping[str, str]) -> str | None:
        return None

    def check(self, lower_dirs: Sequence[str]) -> None:
        return None

    def committed(self, name: str, labels: Mapping[str, str], upper_dir: str) -> None:
        return None

    def prepared(self, key: str, lower_dirs: Sequence[str]) -> None:
        return None


def open_dir(path: str) -> None:
    """Open and close `path` as a directory (a request to a FUSE daemon, never cached)."""
    os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY))


class Prober:
    """Timed directory probes; at most `max_hung` may still hang (answered late or never)."""

    def __init__(self, timeout: float = 2.0, max_hung: int = 4, *,
                 open_dir: Callable[[str], None] = open_dir) -> None:
        self.timeout = timeout
        self.max_hung = max_hung
        self._open_dir = open_dir
        self._lock = threading.Lock()
        self._hung = 0  # probes that timed out and whose thread has not returned yet

    def hung(self) -> int:
        with self._lock:
            return self._hung

    def probe(self, path: str) -> OSError | None:
        """Open `path` as a directory: None if it did, the error if it failed; Unavailable
        if it did not answer within the timeout (or too many earlier probes still hang)."""
        return self.run(path, lambda: self._open_dir(path))

    def run(self, what: str, fn: Callable[[], None]) -> OSError | None:
        """`fn()` in a thread that may be abandoned: None if it returned, the OSError it
        raised; Unavailable if it did not return within the timeout (or too many earlier
        calls still hang)."""
        with self._lock:
            if self._hung >= self.max_hung:
                raise Unavailable(f"{what}: {self._hung} earlier probes of the layers mount still hang")
        state: dict[str, object] = {"done": False, "hung": False, "error": None}

        def run() -> None:
            try:
                fn()
            except OSError as exc:
                state["error"] = exc
            finally:
                with self._lock:
                    state["done"] = True
                    if state["hung"]:
                        self._hung -= 1

        thread = threading.Thread(target=run, name=f"probe {what}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        with self._lock:
            if not state["done"]:
                state["hung"] = True
                self._hung += 1
                raise Unavailable(f"{what}: no answer within {self.timeout:g}s "
                                  "(is the p2pfs daemon alive?)")
        return state["error"]  # type: ignore[return-value]


class DirRemoteLayers(NoRemoteLayers):
    """Layers as `<mount>/<hex>` directories, found by the digest labels in `label_keys`."""

    def __init__(self, mount: str | Path, label_keys: Sequence[str] = LAYER_DIGEST_LABELS, *,
                 timeout: float = 2.0, max_hung: int = 4) -> None:
        self.mount = os.path.abspath(mount)
        self.label_keys = tuple(label_keys)
        self.prober = Prober(timeout, max_hung)

    def lookup(self, labels: Mapping[str, str]) -> str | None:
        for key in self.label_keys:
            m = _DIGEST.fullmatch(labels.get(key, ""))
            if not m:
                continue
            path = os.path.join(self.mount, m.group(1))
            try:
                err = self.prober.probe(path)
            except Unavailable as exc:
                err = exc
            if err is None:
                return path
            # Not converted (ENOENT), or the mount is down: either way a normal pull works.
            if getattr(err, "errno", None) != errno.ENOENT:
                log.warning("layer %s: %s; pulling it normally", m.group(1)[:12], err)
        return None

    def check(self, lower_dirs: Sequence[str]) -> None:
        for path in lower_dirs:
            err = self.prober.probe(path)
            if err is not None:
                raise Unavailable(f"remote layer {path}: {err.strerror or err}")
