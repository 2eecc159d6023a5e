"""Archive safety: no path may land outside the target. Zip extraction lives here;
tar streams are extracted by ``meshserve.loaders.tarstream`` with these same rules.

Refused: absolute paths, ``..`` components, links (symbolic or hard) that point
outside, device files and FIFOs. ``prefix`` selects a subtree (the ``models/``
directory of a KServe modelcar) and strips it.
"""

from __future__ import annotations

import posixpath
import shutil
import zipfile
from pathlib import Path

from meshserve.protocol.errors import ModelLoadError


class UnsafeArchive(ModelLoadError):
    pass


def safe_relative(name: str, prefix: str | None) -> str | None:
    """The member's path under the target, None if outside ``prefix``; raise if unsafe."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute path")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise UnsafeArchive(f"archive member {name!r} escapes the target directory")
    if norm in (".", ""):
        return None
    if prefix:
        if norm == prefix:
            return None
        if not norm.startswith(prefix + "/"):
            return None
        norm = norm[len(prefix) + 1 :]
    return norm


def inside(target: Path, rel: str) -> Path:
    dest = (target / rel).resolve()
    root = target.resolve()
    if dest != root and root not in dest.parents:
        raise UnsafeArchive(f"archive member {rel!r} resolves outside the target directory")
    return dest


def extract_zip(path: Path, target: Path) -> int:
    count = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                rel = safe_relative(info.filename, None)
                if rel is None:
                    continue
                dest = inside(target, rel)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchive(f"zip member {info.filename!r} is a symlink")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                count += 1
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"not a valid zip archive: {e}") from e
    return count
