"""The per-pod model cache: registration, single-flight loads, in-flight tracking.

Every state change is kept on the entry, so the repository API can show it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from protocol.errors import InferenceError, ModelLoadError, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)

H = TypeVar("H")  # a loaded model handle, opaque to the cache


class ModelState(str, Enum):
    REGISTERED = "REGISTERED"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"


@dataclass(eq=False)
class CacheEntry(Generic[H]):
    key: str
    spec: Any
    state: ModelState = ModelState.REGISTERED
    reason: str = ""
    handle: H | None = None
    size_bytes: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    load_seconds: float | None = None
    inflight: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


LoadFn = Callable[[Any], Awaitable[tuple[Any, int]]]
UnloadFn = Callable[[Any], Awaitable[None]]


class ModelCache(Generic[H]):
    """Models by key. ``load_fn(spec) -> (handle, size_bytes)``; ``unload_fn(handle)``."""

    def __init__(self, load_fn: LoadFn, unload_fn: UnloadFn) -> None:
        self._load_fn = load_fn
        self._unload_fn = unload_fn
        self._entries: dict[str, CacheEntry[H]] = {}

    def register(self, key: str, spec: Any) -> CacheEntry[H]:
        """Add a model, or give a known one a new spec for its next load."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = CacheEntry(key, spec)
        else:
            entry.spec = spec
        return entry

    def get(self, key: str) -> CacheEntry[H] | None:
        return self._entries.get(key)

    def entries(self) -> list[CacheEntry[H]]:
        return list(self._entries.values())

    def _entry(self, key: str) -> CacheEntry[H]:
        entry = self._entries.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} is not registered")
        return entry

    async def load(self, key: str, spec: Any = None) -> CacheEntry[H]:
        """Load (or, with a new spec, reload) a model. One load at a time per model;
        a failed reload leaves the serving copy in place."""
        entry = self._entry(key)
        async with entry._lock:
            if spec is None and entry.state is ModelState.READY:
                return entry
            new_spec = entry.spec if spec is None else spec
            serving = entry.state is ModelState.READY
            if not serving:
                entry.state, entry.reason = ModelState.LOADING, ""
            started = time.monotonic()
            try:
                handle, size = await self._load_fn(new_spec)
            except Exception as e:
                reason = e.message if isinstance(e, InferenceError) else f"{type(e).__name__}: {e}"
                if not isinstance(e, InferenceError):
                    log.exception("loading model %s failed", key)
                if serving:
                    raise ModelLoadError(
                        f"reloading model {key!r} failed, the loaded copy still serves: {reason}"
                    ) from None
                entry.state, entry.reason = ModelState.FAILED, reason
                raise ModelLoadError(f"loading model {key!r} failed: {reason}") from None
            old = entry.handle if serving else None
            entry.spec, entry.handle, entry.size_bytes = new_spec, handle, size
            entry.state, entry.reason = ModelState.READY, ""
            entry.loaded_at = time.time()
            entry.load_seconds = time.monotonic() - started
            log.info("model %s ready in %.3fs (%d bytes)", key, entry.load_seconds, size)
        if old is not None:
            await self._unload_fn(old)
        return entry

    async def unload(self, key: str) -> None:
        """Unload a model; it stays registered. In-flight requests finish first."""
        entry = self._entry(key)
        async with entry._lock:
            if entry.handle is None:
                entry.state, entry.reason = ModelState.UNLOADED, "unloaded"
                return
            entry.state = ModelState.UNLOADING
            while entry.inflight:
                await asyncio.sleep(0.005)
            handle, entry.handle, entry.size_bytes = entry.handle, None, 0
            try:
                await self._unload_fn(handle)
            finally:
                entry.state, entry.reason = ModelState.UNLOADED, "unloaded"

    @asynccontextmanager
    async def acquire(self, key: str) -> AsyncIterator[H]:
        """Hold a ready model for one request."""
        entry = self._entry(key)
        if entry.state is not ModelState.READY or entry.handle is None:
            state = entry.state.value.lower()
            detail = f": {entry.reason}" if entry.reason and entry.state is ModelState.FAILED else ""
            raise ModelNotReady(f"model {key!r} is not ready ({state}{detail})")
        entry.inflight += 1
        try:
            yield entry.handle
        finally:
            entry.inflight -= 1
            entry.last_used = time.time()

    async def close(self) -> None:
        """Unload every model (at shutdown)."""
        for key, entry in list(self._entries.items()):
            if entry.handle is not None:
                try:
                    await self.unload(key)
                except Exception:
                    log.exception("unloading model %s at shutdown failed", key)
