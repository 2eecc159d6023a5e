"""A streaming tar extractor that writes file data straight from the incoming chunks.

``tarfile``'s stream mode re-buffers and joins every block it reads; for model
weights (hundreds of MB) those copies cost more than the disk. This reads the
512-byte headers with ``tarfile.TarInfo.frombuf``, handles PAX and GNU
long names, and hands file bodies to ``write`` as memoryview slices of the
chunks, with the same safety rules as ``meshserve.loaders.archive``.

Headers are checked before they are trusted: a negative or absurd size, a PAX
record whose length is zero, negative, or runs past its header, a metadata header
larger than ``MAX_META`` or one that never ends in a member: each is refused
(``UnsafeArchive``), as each could otherwise spin the loop for ever or hold the
whole stream in memory.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from meshserve.loaders.archive import UnsafeArchive, check_links, check_symlink, inside, member_path, safe_relative
from meshserve.loaders.limits import LoadBudget
from meshserve.protocol.errors import ModelLoadError

BLOCK = 512
CHUNK = 1024 * 1024
MAX_META = 1024 * 1024  # bytes of PAX / GNU long-name data before one member
META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
PAX_NUMBERS = ("size", "uid", "gid", "mtime", "atime", "ctime")


class _Feed:
    """Pull bytes from an iterator of chunks without copying when a request fits in one chunk."""

    def __init__(self, chunks: Iterator[bytes], budget: LoadBudget) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")
        self._budget = budget

    def _refill(self) -> bool:
        self._budget.check()
        for chunk in self._chunks:
            if chunk:
                self._budget.unpack(len(chunk), "the tar stream")  # skipped bytes cost time too
                self._view = memoryview(chunk)
                return True
        return False

    def exact(self, n: int) -> bytes:
        """Exactly n bytes (short only at the end of the stream)."""
        if n < 0:
            raise UnsafeArchive(f"tar header asks for {n} bytes")
        parts = []
        while n:
            if not self._view and not self._refill():
                break
            take = self._view[:n]
            parts.append(bytes(take))
            self._view = self._view[len(take) :]
            n -= len(take)
        return b"".join(parts)

    def views(self, n: int) -> Iterator[memoryview]:
        """n bytes as memoryview slices of the chunks (no copies)."""
        if n < 0:
            raise UnsafeArchive(f"tar header asks for {n} bytes")
        while n:
            if not self._view and not self._refill():
                raise ModelLoadError("tar stream ended inside a file")
            take = self._view[:n]
            self._view = self._view[len(take) :]
            n -= len(take)
            yield take

    def skip(self, n: int) -> None:
        for _ in self.views(n):
            pass


def gunzip(chunks: Iterator[bytes], out_chunk: int = CHUNK) -> Iterator[bytes]:
    """Inflate at most ``out_chunk`` bytes at a time: one 1 MiB chunk of a gzip bomb would
    otherwise become a gigabyte in memory before anything could count it."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        for chunk in chunks:
            data = chunk
            while data:
                out = d.decompress(data, out_chunk)
                if out:
                    yield out
                data = d.unconsumed_tail
                if d.eof:
                    break
            if d.eof:
                break  # trailing bytes after the gzip member are ignored, as gzip -d does
        tail = d.flush()
    except zlib.error as e:
        raise UnsafeArchive(f"not a valid gzip stream: {e}") from None
    if tail:
        yield tail


def parse_pax(data: bytes) -> dict[str, str]:
    """PAX records ``"<len> <key>=<value>\\n"``, each checked before it moves the cursor."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:] == bytes(len(data) - pos):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise UnsafeArchive(f"malformed PAX record at byte {pos}: no length")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise UnsafeArchive(f"malformed PAX record at byte {pos}: length {length} does not fit its header")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise UnsafeArchive(f"malformed PAX record at byte {pos}: no key=value")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    for key in PAX_NUMBERS:
        if key in fields:
            text = fields[key].partition(".")[0] if key.endswith("time") else fields[key]
            if not text.isdigit():
                raise UnsafeArchive(f"PAX {key} {fields[key]!r} is not a non-negative number")
    return fields


def _header(block: bytes) -> tarfile.TarInfo:
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError, OverflowError) as e:
        raise UnsafeArchive(f"not a valid tar archive: {e}") from None
    if info.size < 0:
        raise UnsafeArchive(f"tar member {info.name!r} has a negative size {info.size}")
    if info.type in META_TYPES and info.size > MAX_META:
        raise UnsafeArchive(f"tar metadata header of {info.size} bytes (more than {MAX_META})")
    return info


def extract_chunks(
    chunks: Iterator[bytes], target: Path, prefix: str | None = None, budget: LoadBudget | None = None
) -> int:
    """Extract an uncompressed tar given as chunks; return the number of files written."""
    budget = budget or LoadBudget()
    try:
        count = _extract(_Feed(chunks, budget), target, prefix, budget)
    except OSError as e:
        check_links(target, refuse=False)
        raise ModelLoadError(f"cannot extract the tar archive: {e.strerror or e}") from None
    except BaseException:
        check_links(target, refuse=False)
        raise
    check_links(target)
    return count


def _extract(feed: _Feed, target: Path, prefix: str | None, budget: LoadBudget) -> int:
    count = 0
    pending: dict[str, str] = {}
    meta = 0
    while True:
        budget.check()
        header = feed.exact(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            break  # end of archive (two zero blocks, or a truncated tail)
        info = _header(header)
        padded = -info.size % BLOCK
        if info.type in META_TYPES:
            meta += info.size
            if meta > MAX_META:
                raise UnsafeArchive(f"more than {MAX_META} bytes of tar metadata before one member")
            data = feed.exact(info.size)
            if len(data) < info.size:
                raise UnsafeArchive("tar stream ended inside a metadata header")
            feed.skip(padded)
            if info.type == tarfile.XHDTYPE:
                pending.update(parse_pax(data))
            elif info.type == tarfile.XGLTYPE:
                parse_pax(data)  # checked; global defaults are not applied
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                pending["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                pending["linkpath"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pending.get("path", info.name)
        link = pending.get("linkpath", info.linkname)
        size = int(pending["size"]) if "size" in pending else info.size
        padded = -size % BLOCK
        pending, meta = {}, 0
        rel = safe_relative(name, prefix)
        if rel is None:
            feed.skip(size + padded)
            continue
        if info.isdir():
            member_path(target, rel).mkdir(parents=True, exist_ok=True)
        elif info.isreg():
            budget.expect_unpack(size, f"tar member {name!r}")
            dest = member_path(target, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            fd = os.open(dest, flags, 0o644 | (info.mode & 0o111))
            try:
                for view in feed.views(size):
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            count += 1
        elif info.issym():
            check_symlink(name, rel, link)
            dest = member_path(target, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, dest)
        elif info.islnk():
            link_rel = safe_relative(link, prefix)
            if link_rel is None:
                raise UnsafeArchive(f"hard link {name!r} points outside the models tree")
            source = inside(target, link_rel)
            if not source.is_file():
                raise UnsafeArchive(f"hard link {name!r} points to {link!r}, not an earlier file")
            dest = member_path(target, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, dest)
            count += 1
        else:
            raise UnsafeArchive(f"archive member {name!r} is a device or FIFO")
        if not info.isreg():
            feed.skip(size)  # links and directories carry no data, but be exact
        feed.skip(padded)
    return count
