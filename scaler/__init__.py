"""p2pfs-scaler: a concurrency-based autoscaler."""
