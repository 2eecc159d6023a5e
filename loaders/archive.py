"""Archive safety: no path may land outside the target. Zip extraction lives here;
tar streams are extracted by ``meshserve.loaders.tarstream`` with these same rules.

Refused: absolute paths, ``..`` components, links (symbolic or hard) that point
outside, device files and FIFOs. A symlink is checked when it is made (its target,
read lexically, stays inside) and the finished tree again (``check_links``): a chain
of links, each harmless when made, may point outside once a later member lands.
``prefix`` selects a subtree (the ``models/`` directory of a KServe modelcar) and
strips it. Every byte written is charged to a ``LoadBudget`` first.
"""

from __future__ import annotations

import os
import posixpath
import zipfile
import zlib
from pathlib import Path

from meshserve.loaders.limits import LoadBudget
from meshserve.protocol.errors import ModelLoadError

CHUNK = 1024 * 1024


class UnsafeArchive(ModelLoadError):
    """The archive is malformed or would write outside its folder: the source is at fault."""

    http_status = 422
    grpc_code = "INVALID_ARGUMENT"


def safe_relative(name: str, prefix: str | None) -> str | None:
    """The member's path under the target, None if outside ``prefix``; raise if unsafe."""
    if "\0" in name:
        raise UnsafeArchive(f"archive member {name!r} has a NUL in its name")
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


def member_path(target: Path, rel: str) -> Path:
    """Where member ``rel`` goes: its folder resolved (and inside), its own name not followed,
    so a member never writes through a link of the same name."""
    parent, _, name = rel.rpartition("/")
    where = inside(target, parent) / name
    if where.is_symlink():
        where.unlink()  # a later member replaces the link, as tar does
    return where


def check_symlink(name: str, rel: str, link: str) -> None:
    """A symlink's target, read lexically from the link's folder, must stay inside."""
    if not link or "\0" in link:
        raise UnsafeArchive(f"symlink {name!r} has an empty or malformed target")
    if link.startswith("/") or (len(link) > 1 and link[1] == ":"):
        raise UnsafeArchive(f"symlink {name!r} points to an absolute path")
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
    if lexical == ".." or lexical.startswith("../"):
        raise UnsafeArchive(f"symlink {name!r} points outside the target directory")


def check_links(target: Path, refuse: bool = True) -> None:
    """Every symlink in the finished tree resolves inside it (after all links are followed).
    Those that do not are removed (the tree is never published, but nothing is left pointing
    out); with ``refuse`` the first is reported as UnsafeArchive."""
    root = os.path.realpath(target)
    escaping = []
    for folder, dirs, files in os.walk(target):
        for entry in (*dirs, *files):
            path = os.path.join(folder, entry)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if real != root and not real.startswith(root + os.sep):
                    escaping.append(path)
    for path in escaping:
        os.unlink(path)
    if escaping and refuse:
        rel = os.path.relpath(escaping[0], target)
        raise UnsafeArchive(f"symlink {rel!r} points outside the target directory through other links")


def extract_zip(path: Path, target: Path, budget: LoadBudget | None = None) -> int:
    budget = budget or LoadBudget()
    count = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                budget.check()
                rel = safe_relative(info.filename, None)
                if rel is None:
                    continue
                dest = member_path(target, rel)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchive(f"zip member {info.filename!r} is a symlink")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    # file_size is the header's word: count what really inflates.
                    while chunk := src.read(CHUNK):
                        budget.unpack(len(chunk), f"zip member {info.filename!r}")
                        out.write(chunk)
                count += 1
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        raise UnsafeArchive(f"not a valid zip archive: {type(e).__name__}: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot extract the zip archive: {e.strerror or e}") from None
    return count
