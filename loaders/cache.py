"""A content-addressed cache of unpacked models, shared by every model (and process)
that uses the same content.

    root/content/<algo>-<hex>/   complete unpacked trees, renamed into place atomically
    root/refs/<sha256(uri)>.json the digest a URI (a tag, a URL) resolved to last time
    root/tmp/                    work in progress; removed on failure and at start
    root/locks/                  one flock per digest: two pulls of the same content, one download

A crash mid-pull leaves only tmp/ behind, never a half tree under content/. Entries
are touched on use; past ``max_bytes`` the least recently used ones not in use go.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meshserve.loaders.files import files_size

_SIZE_FILE = ".meshserve-size"


class ContentCache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        for sub in ("content", "refs", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}

    # -- lookups ---------------------------------------------------------------
    def path_for(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if not algo.isalnum() or not hexdigest.isalnum():
            raise ValueError(f"malformed digest {digest!r}")
        return self.root / "content" / f"{algo}-{hexdigest}"

    def get(self, digest: str) -> Path | None:
        path = self.path_for(digest)
        if path.is_dir():
            os.utime(path)
            return path
        return None

    def ref(self, uri: str) -> str | None:
        """The digest ``uri`` resolved to last time (used when the source is unreachable)."""
        try:
            return json.loads(self._ref_file(uri).read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return None

    def set_ref(self, uri: str, digest: str) -> None:
        path = self._ref_file(uri)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"uri": uri, "digest": digest, "time": time.time()}))
        os.replace(tmp, path)

    def _ref_file(self, uri: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(uri.encode()).hexdigest() + ".json")

    # -- filling -----------------------------------------------------------------
    def fill(self, digest: str, produce: Callable[[Path], None]) -> Path:
        """The tree for ``digest``, calling ``produce(tmp_dir)`` to make it if absent.
        Concurrent callers (threads or processes) wait for one producer."""
        path = self.path_for(digest)
        if path.is_dir():
            os.utime(path)
            return path
        with self._digest_lock(digest):
            if path.is_dir():  # another producer finished while we waited
                return path
            tmp = Path(os.path.join(self.root, "tmp", f"{path.name}.{os.getpid()}.{threading.get_ident()}"))
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                produce(tmp)
                (tmp / _SIZE_FILE).write_text(str(files_size(tmp)))
                os.rename(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.clean_up(keep=digest)
        return path

    @contextmanager
    def _digest_lock(self, digest: str) -> Iterator[None]:
        lock_path = self.root / "locks" / (digest.replace(":", "-") + ".lock")
        with open(lock_path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- use and clean-up -----------------------------------------------------------
    @contextmanager
    def in_use(self, path: Path) -> Iterator[None]:
        """Keep an entry from clean-up while a model loads from it."""
        with self._lock:
            self._in_use[path.name] = self._in_use.get(path.name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[path.name] -= 1

    def size(self) -> int:
        return sum(self._entry_size(p) for p in (self.root / "content").iterdir())

    @staticmethod
    def _entry_size(path: Path) -> int:
        try:
            return int((path / _SIZE_FILE).read_text())
        except (OSError, ValueError):
            return files_size(path)

    def clean_up(self, keep: str | None = None) -> list[Path]:
        """Remove least recently used entries until under ``max_bytes``."""
        if self.max_bytes is None:
            return []
        entries = sorted((self.root / "content").iterdir(), key=lambda p: p.stat().st_mtime)
        sizes = {p: self._entry_size(p) for p in entries}
        total = sum(sizes.values())
        removed = []
        keep_name = self.path_for(keep).name if keep else None
        for p in entries:
            if total <= self.max_bytes:
                break
            with self._lock:
                busy = self._in_use.get(p.name, 0) > 0
            if busy or p.name == keep_name:
                continue
            trash = self.root / "tmp" / f"trash-{p.name}-{time.monotonic_ns()}"
            os.rename(p, trash)  # atomic: readers never see a half-deleted tree
            shutil.rmtree(trash, ignore_errors=True)
            total -= sizes[p]
            removed.append(p)
        return removed
