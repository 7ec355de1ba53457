"""containerd proxy snapshotter serving image layers lazily from a p2pfs mount.

    _metadata, _filters   pure: containerd's snapshot rules, its filter language
    _store                sqlite + ROOT/snapshots/<id>/{fs,work}
    _layerfs              RemoteLayers (lookup/check/hooks), NoRemoteLayers, DirRemoteLayers
    _p2pfs                the p2pfs-backed RemoteLayers and convert on first pull
    snapshotter           Snapshotter: the rules over the store and the remote layers
    _proto, _grpc         snapshots.v1 messages; the gRPC adapter (the only place codes exist)
    _cri                  a CRI image service client (`p2pfs-snapshotter pull`)
    cli                   `p2pfs-snapshotter serve|pull`

Design: docs/ARCHITECTURE.md, "Snapshotter".
"""

from ._errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                      ServedRemotely, SnapshotterError, Unavailable)
from ._layerfs import DirRemoteLayers, NoRemoteLayers, RemoteLayers
from ._store import Store
from .snapshotter import Snapshotter

__all__ = ["AlreadyExists", "DirRemoteLayers", "FailedPrecondition", "InvalidArgument",
           "NoRemoteLayers", "NotFound", "RemoteLayers", "ServedRemotely", "Snapshotter",
           "SnapshotterError", "Store", "Unavailable"]
