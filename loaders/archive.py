"""Unpack tar and zip archives safely: no path may land outside the target.

Refused: absolute paths, ``..`` components, links (symbolic or hard) that point
outside, device files and FIFOs. ``prefix`` selects a subtree (the ``models/``
directory of a KServe modelcar) and strips it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from protocol.errors import ModelLoadError


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


def extract_tar_stream(fileobj: IO[bytes], target: Path, prefix: str | None = None, mode: str = "r|*") -> int:
    """Extract a (possibly compressed) tar read sequentially from ``fileobj``; return files written."""
    count = 0
    try:
        with tarfile.open(fileobj=fileobj, mode=mode, bufsize=1024 * 1024) as tar:
            for member in tar:
                rel = safe_relative(member.name, prefix)
                if rel is None:
                    continue
                dest = inside(target, rel)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    os.chmod(dest, 0o644 | (member.mode & 0o111))
                    count += 1
                elif member.issym() or member.islnk():
                    link = member.linkname
                    if member.islnk():  # hard links name a member path
                        link_rel = safe_relative(link, prefix)
                        if link_rel is None:
                            raise UnsafeArchive(f"hard link {member.name!r} points outside the models tree")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(inside(target, link_rel), dest)
                        count += 1
                        continue
                    if posixpath.isabs(link):
                        raise UnsafeArchive(f"symlink {member.name!r} points to an absolute path")
                    inside(target, posixpath.join(posixpath.dirname(rel), link))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, dest)
                else:
                    raise UnsafeArchive(f"archive member {member.name!r} is a device or FIFO")
    except tarfile.TarError as e:
        raise ModelLoadError(f"not a valid tar archive: {e}") from e
    return count


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
