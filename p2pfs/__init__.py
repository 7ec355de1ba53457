"""p2pfs: lazy, verified, cached FUSE filesystem for model weights."""
