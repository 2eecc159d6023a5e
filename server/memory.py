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
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None))
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def reachable_bytes(root: object, max_depth: int = 8, max_objects: int = 100_000) -> int:
    """Bytes that ``root`` holds: the Python objects reachable from it (its attributes,
    lists, tuples, sets and dicts, ``depth`` levels down) by ``sys.getsizeof``, numpy arrays
    and torch tensors by their buffers, each buffer once however many views share it.

    Thread-safe and cheap (no tracing), so it sizes a model after a load on a worker
    thread while other loads run, which an RSS delta cannot. Modules, classes and
    functions are shared code, not the model's; memory a C extension holds outside
    Python objects is invisible here (such runtimes report ``size_bytes`` themselves).
    """
    # A module another load thread is still importing sits in sys.modules half built:
    # its classes may not exist yet (and then no object of them can either).
    ndarray = _class_of(sys.modules.get("numpy"), "ndarray")
    tensor = _class_of(sys.modules.get("torch"), "Tensor")
    seen: set[int] = set()
    buffers: set[int] = set()
    total = 0
    stack: list[tuple[object, int]] = [(root, 0)]
    while stack and len(seen) < max_objects:
        obj, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, ndarray):
            total += _array_bytes(obj, buffers, ndarray)
            continue
        if tensor and isinstance(obj, tensor):
            total += _tensor_bytes(obj, buffers)
            continue
        try:
            total += sys.getsizeof(obj)
        except TypeError:
            continue
        if isinstance(obj, _LEAVES) or depth >= max_depth:
            continue
        if isinstance(obj, dict):
            children = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        else:
            attrs = getattr(obj, "__dict__", None)
            if not isinstance(attrs, dict):
                continue
            children = [attrs]
        stack.extend((child, depth + 1) for child in children)
    return total


def _array_bytes(a: Any, buffers: set[int], ndarray: type) -> int:
    """The whole buffer under ``a`` (a view counts the array it views), once."""
    while isinstance(a.base, ndarray):
        a = a.base
    owner = a if a.base is None else a.base
    if id(owner) in buffers:
        return 0
    buffers.add(id(owner))
    # getsizeof counts the data of an array that owns it, not of one over another buffer.
    return sys.getsizeof(a) if a.flags.owndata else sys.getsizeof(a) + int(a.nbytes)


def _tensor_bytes(t: Any, buffers: set[int]) -> int:
    try:
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
    except Exception:  # a meta or sparse tensor: no plain storage to count
        return sys.getsizeof(t)
    if t.device.type != "cpu" or ptr in buffers:  # GPU memory is not this process's RSS
        return sys.getsizeof(t)
    buffers.add(ptr)
    return size + sys.getsizeof(t)


def _class_of(module: object, name: str) -> type | tuple[()]:
    """``module.name`` when the module is imported and has it, else an empty isinstance tuple."""
    cls = module.__dict__.get(name) if module is not None else None
    return cls if isinstance(cls, type) else ()
