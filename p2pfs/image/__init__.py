"""Container image layers: OCI layer tars converted into p2pfs layer manifests and packs
of zstd chunks (docs/FORMAT.md, "Image layers"), and an OCI distribution client.

    convert_layer(origin, root, open_blob, ...) -> LayerResult   one layer blob, published
    layer_exists(origin, root, hex)                              converted already?
    read_layer(read, store) -> entries                           the pure tar core (_tar)
    Packer                                                       chunks, zstd, packs, dedup (_pack)
    convert_image(origin, root, ref, ...) -> ImageResult         every layer of an image (_images)
    Registry(plain_http=, credentials=): resolve, open_blob      OCI distribution client (_registry)
    parse_reference(str) -> Reference, Platform                  pure references, platforms (_oci)

Errors are p2pfs.errors.LayerError (the blob), OriginError (the store) and RegistryError
(the registry, or an image that cannot be converted).
"""

from ._convert import LayerResult, codec_of, convert_layer, layer_exists, load_known, manifest_key
from ._pack import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, Packer, StoredChunk
from ._tar import LayerTree, clean_path, read_layer
from ._images import ImageLayer, ImageResult, convert_image
from ._oci import Descriptor, ImageManifest, Platform, Reference, parse_reference
from ._registry import Credentials, Registry, docker_config_auths

__all__ = ["LayerResult", "codec_of", "convert_layer", "layer_exists", "load_known", "manifest_key",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_PACK_SIZE", "Packer", "StoredChunk",
           "LayerTree", "clean_path", "read_layer",
           "ImageLayer", "ImageResult", "convert_image", "Descriptor", "ImageManifest", "Platform",
           "Reference", "parse_reference", "Credentials", "Registry", "docker_config_auths"]
