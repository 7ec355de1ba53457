"""The p2pfs exception tree.

    P2PFSError
    ├── ConfigError              bad settings or arguments (our user's mistake)
    ├── ManifestError            a manifest that is missing, malformed or of an unknown version
    │   └── ManifestNotFound
    ├── OriginError              the object store failed us
    │   ├── OriginUnavailable    transient: connection refused, timeout, 5xx, throttling
    │   ├── ObjectNotFound       the key (or bucket) does not exist
    │   ├── ObjectTruncated      a range past the object's end: it changed since it was
    │   │                        indexed (permanent for that manifest, never retried)
    │   └── OriginAccessDenied   credentials rejected
    ├── IntegrityError           bytes that do not match their recorded digest (never served);
    │                            `source` says who sent them (origin, disk, peer:<id>)
    ├── FetchTimeout             a chunk could not be had within the read deadline
    ├── RecentlyFailed           a chunk whose read failed moments ago (failing fast)
    ├── InternalError            a bug of ours, logged with its traceback; never blamed on
    │                            the store (or, later, on a peer)
    ├── CacheFull                a prefetch asked for more than the disk cache can keep
    ├── ProtocolError            a control-socket request we cannot serve as sent (the
    │                            client's mistake: answered, never logged as ours)
    ├── LayerError               an image layer blob that cannot be converted (a malformed or
    │                            hostile tar, an unknown media type, a digest that differs)
    ├── RegistryError            a container registry refused or failed us (p2pfs.image), or
    │   │                        an image it serves that p2pfs cannot convert
    │   ├── RegistryUnavailable  unreachable, timed out, 5xx, a broken stream: maybe later
    │   ├── RegistryNotFound     no such repository, tag, manifest or blob
    │   └── RegistryAuthError    credentials missing or rejected
    └── PeerError                a peer could not give us a chunk (never shown to readers:
        │                        the next rank or the origin is asked instead)
        ├── PeerUnavailable      refused, timed out, reset, draining: lowers its health
        ├── PeerBusy             503 + Retry-After: its upload queue is full; move on
        ├── PeerMiss             the peer has no copy and was asked not to fetch one
        ├── PeerUnauthorized     401: our token and theirs differ (a configuration error)
        └── PeerProtocolError    an answer that breaks the protocol: bans the peer

Library errors (botocore, OS) are mapped to these at the edge (`p2pfs/origin/`); the FUSE
operations module is the only place that turns them into errno values.
"""

from __future__ import annotations


class P2PFSError(Exception):
    """Base of every error p2pfs raises on purpose."""


class ConfigError(P2PFSError):
    pass


class ManifestError(P2PFSError):
    pass


class ManifestNotFound(ManifestError):
    pass


class OriginError(P2PFSError):
    pass


class OriginUnavailable(OriginError):
    """A failure worth retrying: the store may answer later."""


class ObjectNotFound(OriginError):
    pass


class ObjectTruncated(OriginError):
    """The object is shorter than a manifest's chunk range: retrying will not help."""


class OriginAccessDenied(OriginError):
    pass


class IntegrityError(P2PFSError):
    def __init__(self, message: str = "", *, source: str = "origin") -> None:
        super().__init__(message)
        #: Who sent the bytes: "origin", "disk" or "peer:<node id>" (a peer gets banned).
        self.source = source


class FetchTimeout(P2PFSError):
    pass


class RecentlyFailed(P2PFSError):
    """A chunk that failed within the last `fetch.fail_fast` seconds: not retried yet."""


class InternalError(P2PFSError):
    """An unexpected exception inside p2pfs, reported to readers as EIO."""


class CacheFull(P2PFSError):
    pass


class ProtocolError(P2PFSError):
    """A control-socket client broke the protocol (p2pfs.control._wire)."""


class LayerError(P2PFSError):
    """An image layer that p2pfs refuses to convert (p2pfs.image): nothing is published."""


class RegistryError(P2PFSError):
    """A registry's refusal or failure, or an image p2pfs cannot convert (p2pfs.image)."""


class RegistryUnavailable(RegistryError):
    pass


class RegistryNotFound(RegistryError):
    pass


class RegistryAuthError(RegistryError):
    pass


class PeerError(P2PFSError):
    """A peer did not give us a chunk; `peer` is its node id."""

    def __init__(self, message: str = "", *, peer: str = "") -> None:
        super().__init__(message)
        self.peer = peer


class PeerUnavailable(PeerError):
    pass


class PeerBusy(PeerError):
    def __init__(self, message: str = "", *, peer: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message, peer=peer)
        self.retry_after = retry_after


class PeerMiss(PeerError):
    pass


class PeerUnauthorized(PeerError):
    pass


class PeerProtocolError(PeerError):
    pass


def is_temp_failure(exc: BaseException) -> bool:
    """Whether retrying the same request later may succeed."""
    return isinstance(exc, OriginUnavailable)
