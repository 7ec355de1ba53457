"""containerd remote snapshotter backed by p2pfs (not built yet)."""
