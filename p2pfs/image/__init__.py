"""Container image layers: OCI layer tars converted into p2pfs layer manifests and packs
of zstd chunks (docs/FORMAT.md, "Image layers"), and an OCI distribution client."""
