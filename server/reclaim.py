"""Give an unloaded model's memory back promptly, so resident memory follows the cache.

Every load of a user's ``model.py`` imports it afresh: a module, its classes and their
functions, which refer to each other. A class is always in a reference cycle, so once the
model is unloaded refcounting frees its arrays but not its code: that waits for a full
(generation 2) collection, which CPython runs only once the objects created since the last
one reach a quarter of the long-lived ones (the resident models' objects and what every
model used keeps), i.e. every several hundred evictions; the garbage in between (~10 KiB
per evicted model) kept resident memory 10-14% past the cache's capacity under churn. Collecting more
often is cheap only if a collection does not walk the server's own objects each time, hence
``settle`` (``gc.freeze`` once registration is done: what the process holds at start-up is
not garbage and is never scanned again).

Collections are batched and rate-limited (a full one holds the GIL for a few ms): after
``batch_bytes`` of unloads (1/16 of the capacity), and at most 1/``duty`` of the time (the
next one waits ``duty`` times as long as the last took: on a faster machine both loads
and collections are faster, so what may pile up in between is about the same number of
models). Free heap pages go back to the OS (``malloc_trim``, which lets go of the GIL) after
each collection and after every ``trim_bytes`` of unloads between them: arrays under the
mmap threshold (server/memory.py) live on the heap and return only that way. A big model
(``big_bytes``) is collected at once: it may hide in a cycle.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import Executor

from meshserve.server.memory import release_free_memory

log = logging.getLogger(__name__)

BIG_MODEL_BYTES = 32 * 1024 * 1024
UNBOUNDED_BATCH_BYTES = 8 * 1024 * 1024
TRIM_BYTES = 8 * 1024 * 1024


class MemoryReclaimer:
    """Collects the garbage of unloaded models in batches; ``capacity_bytes`` sizes a batch
    (1/16 of it: what may sit uncollected is a fraction of that)."""

    def __init__(
        self,
        executor: Executor,
        capacity_bytes: int | None,
        *,
        min_interval: float = 0.01,
        duty: float = 20.0,
        big_bytes: int = BIG_MODEL_BYTES,
        trim_bytes: int = TRIM_BYTES,
    ) -> None:
        self.executor = executor
        self.batch_bytes = capacity_bytes // 16 if capacity_bytes else UNBOUNDED_BATCH_BYTES
        self.min_interval = min_interval
        self.duty = duty
        self.big_bytes = big_bytes
        self.trim_bytes = trim_bytes
        self.freed = 0  # bytes unloaded since the last collection
        self.untrimmed = 0  # bytes unloaded since the last trim
        self.collections = 0
        self.last_seconds = 0.0  # how long the last collection took
        self._next_at = 0.0  # monotonic: no collection before this

    @staticmethod
    def settle() -> None:
        """Once start-up objects exist and before any model loads: collect, then exempt what
        is left from every later collection (a model loaded before this would never be freed
        if it were in a cycle, so call it before the first load)."""
        gc.collect()
        gc.freeze()

    async def unloaded(self, size: int) -> None:
        """A model of ``size`` bytes was unloaded (its last reference dropped by the caller)."""
        self.freed += size
        self.untrimmed += size
        collect = size >= self.big_bytes or (self.freed >= self.batch_bytes and time.monotonic() >= self._next_at)
        if collect or self.untrimmed >= self.trim_bytes:
            self.untrimmed = 0
            if collect:
                self.freed = 0
            await asyncio.get_running_loop().run_in_executor(self.executor, self._release, collect)

    def _release(self, collect: bool) -> None:
        if collect:
            started = time.monotonic()
            gc.collect()
            self.last_seconds = time.monotonic() - started
            self._next_at = time.monotonic() + max(self.min_interval, self.duty * self.last_seconds)
            self.collections += 1
            log.debug("collected after unloads in %.1f ms", self.last_seconds * 1000)
        release_free_memory()  # ctypes lets go of the GIL: requests run meanwhile
