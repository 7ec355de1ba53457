"""Pure OCI distribution data: image references, platforms, descriptors, manifests and
indexes, and `WWW-Authenticate` challenges. Bytes and strings in, frozen values out; no
sockets (the client over HTTP is `_registry.py`).

A reference follows Docker's normalization: `busybox` is
`registry-1.docker.io/library/busybox:latest`; the first path component names a registry
only when it has a `.` or a `:` or is `localhost`; `@sha256:<hex>` pins a digest (and wins
over a tag).
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import RegistryError

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", DOCKER_HUB}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

#: Layer media types we convert, and the compression of each.
LAYER_TYPES: Mapping[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")

MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit too: a bigger one is not a manifest

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str = "digest") -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RegistryError(f"{what} {digest!r} is not a sha256 digest (sha256:<64 hex digits>); "
                            "p2pfs names layers by their sha256")
    return digest


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str     # host[:port] as given ("registry-1.docker.io" for Docker Hub)
    repository: str   # "library/busybox"
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse_reference(text: str) -> Reference:
    """`[host[:port]/]path[:tag][@sha256:hex]` with Docker Hub's defaults."""
    original = text
    if not text or text != text.strip():
        raise RegistryError(f"image reference {original!r} is empty or has spaces")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        check_digest(digest, f"image reference {original!r}: digest")
    name, tag = text, None
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = text[: len(text) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
        if not _TAG.fullmatch(tag):
            raise RegistryError(f"image reference {original!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise RegistryError(f"image reference {original!r}: bad registry host {first!r}")
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry.lower() in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    if not path or not all(_PATH_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise RegistryError(f"image reference {original!r}: bad repository name {path!r} "
                            "(lowercase letters, digits and . _ - separators)")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)


# --- platforms --------------------------------------------------------------------------

_GOARCH = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"),
           "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
           "i386": ("386", None), "i686": ("386", None), "ppc64le": ("ppc64le", None),
           "s390x": ("s390x", None), "riscv64": ("riscv64", None)}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls, machine: str | None = None) -> "Platform":
        """This machine's platform, as GOARCH names it (`uname -m` x86_64 -> amd64)."""
        m = (machine or _platform.machine()).lower()
        arch, variant = _GOARCH.get(m, (m, None))
        return cls("linux", arch, variant)

    def matches(self, other: "Platform") -> bool:
        """Whether an index entry `other` can run here; a missing variant matches any,
        and arm64's default variant is v8."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        default = "v8" if self.architecture == "arm64" else None
        return (other.variant or default) == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


# --- descriptors and manifests ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None  # index entries only


@dataclass(frozen=True, slots=True)
class ImageManifest:
    """One platform's image: what `Registry.resolve` returns."""
    ref: Reference
    digest: str                     # of the manifest bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]  # bottom layer first
    platform: Platform | None = None
    index_digest: str | None = None  # the index / manifest list it was picked from
    diff_ids: tuple[str, ...] = field(default=())


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return doc


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"{what}: a descriptor must be an object")
    mt, size = raw.get("mediaType"), raw.get("size")
    if not isinstance(mt, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what}: descriptor without a mediaType or a valid size")
    plat = raw.get("platform")
    platform = None
    if isinstance(plat, dict) and isinstance(plat.get("os"), str) and isinstance(plat.get("architecture"), str):
        variant = plat.get("variant")
        platform = Platform(plat["os"], plat["architecture"], variant if isinstance(variant, str) and variant else None)
    return Descriptor(mt, check_digest(raw.get("digest"), f"{what}: digest"), size, platform)


def manifest_kind(data: bytes, content_type: str | None) -> tuple[str, dict[str, Any]]:
    """("manifest" | "index", parsed JSON), refusing schema 1 and unknown documents."""
    doc = _json(data, "manifest")
    if not isinstance(doc.get("mediaType", ""), str):
        raise RegistryError("manifest: mediaType is not a string")
    mt = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if mt in _DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError("the registry served a Docker schema 1 manifest (deprecated, unsigned "
                            "layers); push the image again with a current tool")
    if mt in INDEX_TYPES or (not mt and "manifests" in doc):
        return "index", doc
    if mt in MANIFEST_TYPES or (not mt and "layers" in doc):
        return "manifest", doc
    raise RegistryError(f"unsupported manifest media type {mt!r}")


def select_platform(index: dict[str, Any], want: Platform) -> Descriptor:
    """The first entry of an index / manifest list that runs on `want`."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError("image index without a manifests list")
    descs = [_descriptor(e, f"index entry {i}") for i, e in enumerate(entries)]
    for d in descs:
        if d.platform and want.matches(d.platform) and d.media_type in MANIFEST_TYPES:
            return d
    have = ", ".join(str(d.platform) for d in descs if d.platform) or "none"
    raise RegistryError(f"the image has no manifest for {want} (it has: {have}); "
                        "pick one with --platform os/arch[/variant]")


def parse_manifest(ref: Reference, data: bytes, doc: dict[str, Any], media_type: str | None) -> ImageManifest:
    """An image manifest's config and layers; foreign and unknown layers are refused."""
    config = _descriptor(doc.get("config"), "manifest config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError("manifest without a layers list")
    layers = tuple(_descriptor(x, f"layer {i}") for i, x in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        if layer.media_type in _FOREIGN:
            raise RegistryError(f"layer {i} ({layer.digest}) is a foreign / non-distributable layer "
                                f"({layer.media_type}): it is not in the registry, so p2pfs cannot "
                                "convert this image")
        if layer.media_type not in LAYER_TYPES:
            raise RegistryError(f"layer {i} ({layer.digest}) has media type {layer.media_type!r}; "
                                f"p2pfs converts {', '.join(sorted(set(LAYER_TYPES)))}")
    return ImageManifest(ref, sha256_digest(data), doc.get("mediaType") or media_type or OCI_MANIFEST,
                         config, layers)


def parse_config(data: bytes) -> tuple[Platform | None, tuple[str, ...]]:
    """The platform and rootfs diff ids an image config names."""
    doc = _json(data, "image config")
    os_, arch = doc.get("os"), doc.get("architecture")
    variant = doc.get("variant") if isinstance(doc.get("variant"), str) else None
    platform = Platform(os_, arch, variant or None) if isinstance(os_, str) and isinstance(arch, str) else None
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
    diff_ids = rootfs.get("diff_ids") or []
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise RegistryError("image config: rootfs.diff_ids is not a list of digests")
    return platform, tuple(diff_ids)


# --- WWW-Authenticate --------------------------------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic" (lowercased)
    params: Mapping[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a `WWW-Authenticate` header (registries send one)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        quoted, bare = m.group(2), m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        pos = m.end()
    return Challenge(scheme.lower(), params)


def unique_layers(layers: Sequence[Descriptor]) -> list[Descriptor]:
    """Layers in order without repeats (an image may list one blob twice)."""
    seen: set[str] = set()
    out = []
    for d in layers:
        if d.digest not in seen:
            seen.add(d.digest)
            out.append(d)
    return out
