"""Pull an OCI modelcar image (or a plain ORAS artifact) into the content cache.

Each layer streams through a digest and size check straight into the tar
extractor, which keeps only ``models/`` (KServe's modelcar layout). Nothing is
held in memory but one chunk; a bad blob leaves nothing in the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.loaders.archive import member_path, safe_relative
from meshserve.loaders.cache import ContentCache
from meshserve.loaders.limits import LoadBudget
from meshserve.loaders.oci import DOCKER_CONFIG, OCI_CONFIG, Reference, RegistryClient, RegistryError
from meshserve.loaders.tarstream import extract_chunks, gunzip

log = logging.getLogger(__name__)

GZIP = "gzip"
TAR_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
}
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"


def pull(
    uri: str,
    cache: ContentCache,
    client_for: Callable[[str], RegistryClient],
    platform: str = "linux/amd64",
    offline_first: bool = True,
    progress: Callable[[int], None] | None = None,
    budget: LoadBudget | None = None,
) -> Path:
    """The local directory holding ``uri``'s models, pulling it if the cache lacks it.
    With ``offline_first`` a tag seen before is served from the cache without the network."""
    budget = budget or LoadBudget()
    ref = Reference.parse(uri)
    if ref.digest and (hit := cache.get(ref.digest)) is not None:
        return hit
    if offline_first and (known := cache.ref(str(ref))) and (hit := cache.get(known)) is not None:
        return hit
    client = client_for(ref.registry)
    try:
        digest, manifest = client.image_manifest(ref, platform)
    except RegistryError:
        known = cache.ref(str(ref))
        if known and (hit := cache.get(known)) is not None:
            log.warning("%s: registry unavailable, serving the cached %s", uri, known)
            return hit
        raise
    try:
        sizes = [int(layer.get("size", 0)) for layer in manifest.get("layers", [])]
    except (TypeError, ValueError):
        raise RegistryError(f"{ref}: a layer size in the manifest is not a number") from None
    budget.expect_download(sum(sizes), str(ref))  # each blob is refused past its declared size
    path = cache.fill(digest, lambda tmp: _unpack(client, ref, manifest, tmp, progress, budget))
    cache.set_ref(str(ref), digest)
    return path


def _unpack(
    client: RegistryClient, ref: Reference, manifest: dict[str, Any], target: Path, progress, budget: LoadBudget
) -> None:
    config_type = manifest.get("config", {}).get("mediaType", "")
    is_image = config_type in (OCI_CONFIG, DOCKER_CONFIG)
    files = 0
    for layer in manifest.get("layers", []):
        media_type = layer.get("mediaType", "")
        title = layer.get("annotations", {}).get(TITLE)
        with client.open_blob(ref.repository, layer, progress) as blob:
            if is_image:
                compression = TAR_TYPES.get(media_type)
                if compression is None:
                    raise RegistryError(f"{ref}: layer type {media_type!r} is not supported")
                chunks = gunzip(blob.chunks()) if compression == GZIP else blob.chunks()
                files += extract_chunks(chunks, target, prefix="models", budget=budget)
            elif title and (layer.get("annotations", {}).get(UNPACK) == "true" or media_type.endswith("tar+gzip")):
                chunks = gunzip(blob.chunks()) if media_type.endswith("gzip") else blob.chunks()
                files += extract_chunks(chunks, target, budget=budget)  # a directory, as oras packs one
            elif title:
                rel = safe_relative(title, None)
                if rel is None:
                    raise RegistryError(f"{ref}: artifact layer title {title!r} is not a file name")
                dest = member_path(target, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    for chunk in blob.chunks():
                        budget.unpack(len(chunk), title)
                        out.write(chunk)
                files += 1
            else:
                raise RegistryError(f"{ref}: artifact layer {layer.get('digest')} has no title annotation")
            blob.finish()
    if is_image and files == 0:
        raise RegistryError(f"{ref} holds no files under /models: it is not a modelcar image")
