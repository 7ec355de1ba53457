"""The snapshotter's exception tree; only `_grpc.py` turns it into gRPC status codes.

    SnapshotterError            base; never raised itself
    ├── NotFound                no snapshot (or parent) by that key          -> NOT_FOUND
    ├── AlreadyExists           the key or name is taken                     -> ALREADY_EXISTS
    │   └── ServedRemotely      the answer to a layer Prepare served from the
    │                           p2pfs mount (not an error: containerd skips
    │                           the download)                                -> ALREADY_EXISTS
    ├── InvalidArgument         a request containerd should not have sent    -> INVALID_ARGUMENT
    ├── FailedPrecondition      right request, wrong state (commit of a view,
    │                           remove of a parent)                          -> FAILED_PRECONDITION
    └── Unavailable             a remote lower does not answer in time       -> UNAVAILABLE

containerd's errdefs maps exactly these codes back to its own errors; anything else
(our bugs, a full disk) reaches it as UNKNOWN.
"""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base of every error the snapshotter reports to containerd."""


class NotFound(SnapshotterError):
    """No snapshot by that key or name (or the named parent is missing)."""


class AlreadyExists(SnapshotterError):
    """The key or name is taken, or the layer Prepare asked for is already served remotely."""


class InvalidArgument(SnapshotterError):
    """The request itself is malformed: empty key, bad filter, immutable field, huge label."""


class FailedPrecondition(SnapshotterError):
    """The snapshot is in the wrong state for the operation (not active, has children)."""


class Unavailable(SnapshotterError):
    """A remote lower directory does not answer within the check's time bound."""


class ServedRemotely(AlreadyExists):
    """The answer to a layer Prepare served from the p2pfs mount: ALREADY_EXISTS is how
    containerd learns it need not download the layer (not an error)."""
