"""Container image layers: OCI layer tars converted into p2pfs layer manifests and packs
of zstd chunks (docs/FORMAT.md, "Image layers"), and an OCI distribution client.

    convert_layer(origin, root, open_blob, ...) -> LayerResult   one layer blob, published
    layer_exists(origin, root, hex)                              converted already?
    read_layer(read, store) -> entries                           the pure tar core (_tar)
    Packer                                                       chunks, zstd, packs, dedup (_pack)

Errors are p2pfs.errors.LayerError (the blob) and OriginError (the store).
"""

from ._convert import LayerResult, codec_of, convert_layer, layer_exists, load_known, manifest_key
from ._pack import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, Packer, StoredChunk
from ._tar import LayerTree, clean_path, read_layer

__all__ = ["LayerResult", "codec_of", "convert_layer", "layer_exists", "load_known", "manifest_key",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_PACK_SIZE", "Packer", "StoredChunk",
           "LayerTree", "clean_path", "read_layer"]
