"""Finding the models under a prefix and loading their manifests."""

from __future__ import annotations

import logging

import trio

from .errors import ManifestError, ManifestNotFound, ObjectNotFound
from .manifest import MANIFEST_KEY, Manifest, parse
from .origin import Location, Origin

log = logging.getLogger("p2pfs.discover")


async def load_manifest(origin: Origin, model_prefix: str, *, url: str) -> Manifest:
    key = model_prefix + MANIFEST_KEY
    try:
        data = await origin.get(key)
    except ObjectNotFound:
        raise ManifestNotFound(
            f"{url}: no manifest at {key}; run `p2pfs index {url}` or `p2pfs publish`") from None
    return parse(data, source=f"{origin.name}/{key}")


async def discover(origin: Origin, loc: Location) -> tuple[list[tuple[str, Manifest, str]], list[str]]:
    """Models at or under `loc`: ([(mount dir, manifest, blob prefix)], [problems]).

    A prefix that is itself a model mounts as the root, and a bad manifest there is an
    error. Under a prefix of many models, a bad one is skipped and reported, so one broken
    upload does not take every other model away; if none is usable that is an error."""
    try:
        m = await load_manifest(origin, loc.prefix, url=str(loc))
        return [("", m, loc.prefix)], []
    except ManifestNotFound:
        pass
    objs = await origin.list(loc.prefix)
    suffix = "/" + MANIFEST_KEY
    keys = [o.key for o in objs if o.key.endswith(suffix)]
    if not keys:
        raise ManifestNotFound(
            f"{loc}: no p2pfs manifest at or under this prefix; run `p2pfs index URL` for "
            "objects already there, or `p2pfs publish DIR URL`")
    found: list[tuple[str, Manifest, str]] = []
    problems: list[str] = []

    async def one(key: str) -> None:
        model_prefix = key[: -len(MANIFEST_KEY)]
        try:
            m = await load_manifest(origin, model_prefix, url=f"{loc}")
        except ManifestError as exc:
            problems.append(str(exc))
            log.error("skipping model %s: %s", model_prefix, exc)
            return
        found.append((model_prefix[len(loc.prefix):].rstrip("/"), m, model_prefix))

    limiter = trio.CapacityLimiter(16)

    async def bounded(key: str) -> None:
        async with limiter:
            await one(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(bounded, key)
    if not found:
        raise ManifestError(f"{loc}: no usable manifest: " + "; ".join(problems))
    found.sort(key=lambda t: t[0])
    return found, problems
