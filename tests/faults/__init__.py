"""The standing fault suite (issue 12): hostile manifests, hostile control-socket clients,
cache corruption, kill -9, store outages and stalls, a cache disk that fills. See
docs/RELIABILITY.md for what each test asserts and the figures of the last run."""
