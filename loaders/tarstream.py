"""A streaming tar extractor that writes file data straight from the incoming chunks.

``tarfile``'s stream mode re-buffers and joins every block it reads; for model
weights (hundreds of MB) those copies cost more than the disk. This reads the
512-byte headers with ``tarfile.TarInfo.frombuf``, handles PAX and GNU
long names, and hands file bodies to ``write`` as memoryview slices of the
chunks, with the same safety rules as ``meshserve.loaders.archive``.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from meshserve.loaders.archive import UnsafeArchive, inside, safe_relative
from meshserve.protocol.errors import ModelLoadError

BLOCK = 512


class _Feed:
    """Pull bytes from an iterator of chunks without copying when a request fits in one chunk."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")

    def _refill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._view = memoryview(chunk)
                return True
        return False

    def exact(self, n: int) -> bytes:
        """Exactly n bytes (short only at the end of the stream)."""
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


def gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        for chunk in chunks:
            out = d.decompress(chunk)
            if out:
                yield out
        tail = d.flush()
    except zlib.error as e:
        raise ModelLoadError(f"not a valid gzip stream: {e}") from None
    if tail:
        yield tail


def _pax(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def extract_chunks(chunks: Iterator[bytes], target: Path, prefix: str | None = None) -> int:
    """Extract an uncompressed tar given as chunks; return the number of files written."""
    feed = _Feed(chunks)
    count = 0
    pending: dict[str, str] = {}
    while True:
        header = feed.exact(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            break  # end of archive (two zero blocks, or a truncated tail)
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ModelLoadError(f"not a valid tar archive: {e}") from None
        padded = -info.size % BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            data = feed.exact(info.size)
            feed.skip(padded)
            if info.type == tarfile.XHDTYPE:
                pending.update(_pax(data))
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                pending["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                pending["linkpath"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name = pending.get("path", info.name)
        link = pending.get("linkpath", info.linkname)
        size = int(pending["size"]) if "size" in pending else info.size
        padded = -size % BLOCK
        pending = {}
        rel = safe_relative(name, prefix)
        if rel is None:
            feed.skip(size + padded)
            continue
        dest = inside(target, rel)
        if info.isdir():
            dest.mkdir(parents=True, exist_ok=True)
        elif info.isreg():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 | (info.mode & 0o111))
            try:
                for view in feed.views(size):
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            count += 1
        elif info.issym():
            if os.path.isabs(link):
                raise UnsafeArchive(f"symlink {name!r} points to an absolute path")
            inside(target, os.path.join(os.path.dirname(rel), link))
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, dest)
        elif info.islnk():
            link_rel = safe_relative(link, prefix)
            if link_rel is None:
                raise UnsafeArchive(f"hard link {name!r} points outside the models tree")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(inside(target, link_rel), dest)
            count += 1
        else:
            raise UnsafeArchive(f"archive member {name!r} is a device or FIFO")
        if not info.isreg():
            feed.skip(size)  # links and directories carry no data, but be exact
        feed.skip(padded)
    return count
