"""Build a KServe modelcar image from a model directory and push it, without Docker.

The image is ordinary: one gzip layer holding ``models/...`` (files sorted, owner
0, mtime 0, so the same folder always gives the same digest), an image config
whose ``rootfs.diff_ids`` are the uncompressed layer digests, and an OCI
manifest. ``kserve_compat`` adds a layer with a static busybox (``sh``, ``ln``,
``sleep``), which KServe's modelcar sidecar runs to link ``/models``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from meshserve.loaders.oci import OCI_CONFIG, OCI_MANIFEST, Reference, RegistryClient, RegistryError

LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
BUSYBOX_APPLETS = ("sh", "ln", "sleep", "ls", "cat")


class _HashingWriter:
    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


@dataclass
class Layer:
    path: Path
    digest: str  # of the blob as stored (compressed or not)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str = LAYER_TAR_GZIP


def _tar_info(
    name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.linkname = size, kind, mode, link
    info.mtime = info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_layer(out: Path, add: Callable[[tarfile.TarFile], None], compress: bool = True) -> Layer:
    """A tar layer, gzip level 1 by default; uncompressed pulls faster (weights rarely compress)."""
    with open(out, "wb") as f:
        stored = _HashingWriter(f)
        if not compress:
            with tarfile.open(fileobj=stored, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                add(tar)
            digest = "sha256:" + stored.hash.hexdigest()
            return Layer(out, digest, digest, stored.size, LAYER_TAR)
        with gzip.GzipFile(fileobj=stored, mode="wb", compresslevel=1, mtime=0) as gz:
            raw = _HashingWriter(gz)
            with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                add(tar)
    return Layer(out, "sha256:" + stored.hash.hexdigest(), "sha256:" + raw.hash.hexdigest(), stored.size)


def models_layer(model_dir: Path, out: Path, compress: bool = True) -> Layer:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RegistryError(f"{model_dir} is not a directory")

    def add(tar: tarfile.TarFile) -> None:
        tar.addfile(_tar_info("models", kind=tarfile.DIRTYPE, mode=0o755))
        for root, dirs, files in os.walk(model_dir):
            dirs.sort()
            rel_root = Path(root).relative_to(model_dir)
            for d in dirs:
                tar.addfile(_tar_info(f"models/{(rel_root / d).as_posix()}", kind=tarfile.DIRTYPE, mode=0o755))
            for name in sorted(files):
                path = Path(root) / name
                if path.is_symlink() or not path.is_file():
                    continue
                size = path.stat().st_size
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                with open(path, "rb") as f:
                    tar.addfile(_tar_info(f"models/{(rel_root / name).as_posix()}", size, mode=mode), f)

    return build_layer(out, add, compress)


def busybox_layer(busybox: Path, out: Path) -> Layer:
    if not busybox.is_file():
        raise RegistryError(f"busybox binary {busybox} not found (Debian: apt-get install busybox-static)")

    def add(tar: tarfile.TarFile) -> None:
        tar.addfile(_tar_info("bin", kind=tarfile.DIRTYPE, mode=0o755))
        with open(busybox, "rb") as f:
            tar.addfile(_tar_info("bin/busybox", busybox.stat().st_size, mode=0o755), f)
        for applet in BUSYBOX_APPLETS:
            tar.addfile(_tar_info(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777))

    return build_layer(out, add)


def build_and_push(
    model_dir: Path,
    uri: str,
    client: RegistryClient,
    kserve_compat: bool = False,
    busybox: Path = Path("/bin/busybox"),
    progress: Callable[[int], None] | None = None,
    compress: bool = True,
) -> str:
    """Build the modelcar for ``model_dir``, push it as ``uri``; return the manifest digest."""
    ref = Reference.parse(uri)
    with tempfile.TemporaryDirectory(prefix="modelcar-") as tmp:
        layers = []
        if kserve_compat:
            layers.append(busybox_layer(busybox, Path(tmp) / "busybox.tar.gz"))
        layers.append(models_layer(model_dir, Path(tmp) / "models.tar", compress))
        if progress is not None and hasattr(progress, "total"):
            progress.total = sum(layer.size for layer in layers)  # what will be pushed
        config: dict = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]} if kserve_compat else {},
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        for layer in layers:
            with open(layer.path, "rb") as f:
                client.push_blob(ref.repository, f, layer.digest, layer.size, progress)
        client.push_blob(ref.repository, io.BytesIO(config_bytes), config_digest, len(config_bytes))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
            "annotations": {"org.opencontainers.image.title": Path(model_dir).name},
        }
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        return client.push_manifest(ref.repository, ref.tag or "latest", body)
