"""Make freed model memory go back to the OS, so resident memory follows the cache.

glibc raises its mmap threshold each time a large block is freed, after which
large arrays come from the heap, and freed heap memory in per-thread arenas is
rarely returned: a model cache that loads and evicts all day would see RSS
climb far past what it holds. A fixed threshold keeps big buffers in mmap
(returned on free) and few arenas limit fragmentation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_libc = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_measure_lock = threading.Lock()


def rss_bytes() -> int:
    """Resident memory of this process, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class RssDelta:
    bytes: int = 0


@contextmanager
def measure_rss() -> Iterator[RssDelta]:
    """How much resident memory a block adds, for runtimes whose framework cannot say.
    One measurement at a time, so two loads through it do not count each other."""
    delta = RssDelta()
    with _measure_lock:
        before = rss_bytes()
        try:
            yield delta
        finally:
            delta.bytes = max(0, rss_bytes() - before)


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune_allocator(mmap_threshold: int | None = None, arenas: int = 2) -> bool:
    """Fix glibc's mmap threshold (MESHSERVE_MALLOC_MMAP_THRESHOLD, default 4 MiB: model
    buffers above it go back to the OS on free, request buffers below it reuse the heap)."""
    libc = _glibc()
    if libc is None:
        return False
    if mmap_threshold is None:
        mmap_threshold = int(os.environ.get("MESHSERVE_MALLOC_MMAP_THRESHOLD", 4 * 1024 * 1024))
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 8 * mmap_threshold) == 1
    ok &= libc.mallopt(M_ARENA_MAX, arenas) == 1
    return bool(ok)


def release_free_memory() -> None:
    """Hand free heap pages back to the OS (after unloading a model)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
