"""Hot models in every worker (``--workers N``): the in-pod version of the fleet's copies.

Each model has one owner worker (server/workers.py); a request reaching another worker
crosses a Unix socket, which about doubles its CPU cost. When a small model keeps
arriving at a worker that does not own it (``worker_copy_rate`` requests/s, measured
over a short window), that worker loads a copy of its own, if it fits in its share of
memory without evicting anything, and serves the model itself from then on. Copies are
marked ``extra``: the cache evicts them before any single copy (modelmesh/placement.py).
Language models and models bigger than ``worker_copy_max_bytes`` keep one owner.

A repository load or unload goes to the owner as before and is then replayed on every
other worker as a *sync* (``Router.sync``): the copy is dropped and the new settings are
registered there without loading, so no copy ever serves an older version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from meshserve.modelmesh import ModelState
from meshserve.protocol.errors import InferenceError, ModelNotFound
from meshserve.server.load_policy import check_load_config

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane
    from meshserve.server.workers import Router

log = logging.getLogger(__name__)

WINDOW_SECONDS = 2.0
RETRY_AFTER_FAILURE_SECONDS = 60.0
_COPYABLE = (ModelState.REGISTERED, ModelState.EVICTED)


class WorkerCopies:
    def __init__(self, dataplane: DataPlane, router: Router) -> None:
        self.dp = dataplane
        self.router = router
        self.rate = dataplane.settings.worker_copy_rate
        self.max_bytes = dataplane.settings.worker_copy_max_bytes
        self._counts: dict[str, int] = {}
        self._window_start = time.monotonic()
        self._loading: set[str] = set()
        self._failed: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def serve_here(self, name: str, version: str | None = None) -> bool:
        """True when this worker serves an infer request for ``name``: it owns the model or
        holds a ready copy. Otherwise the request is counted toward a copy and forwarded."""
        if self.router.mine(name):
            return True
        if self.rate <= 0:
            return False
        try:
            key = self.dp.repository.resolve(name, version)
        except InferenceError:
            return False  # unknown here: the owner answers
        entry = self.dp.cache.get(key)
        if entry is None:
            return False
        if entry.state is ModelState.READY:
            return True
        self._counts[key] = self._counts.get(key, 0) + 1
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= WINDOW_SECONDS:
            hot = [k for k, n in self._counts.items() if n / elapsed >= self.rate]
            self._counts.clear()
            self._window_start = now
            for k in hot:
                self._maybe_copy(k, now)
        return False

    def _maybe_copy(self, key: str, now: float) -> None:
        entry = self.dp.cache.get(key)
        if entry is None or entry.state not in _COPYABLE or key in self._loading:
            return
        if now - self._failed.get(key, -RETRY_AFTER_FAILURE_SECONDS) < RETRY_AFTER_FAILURE_SECONDS:
            return
        from meshserve.server.llm.service import is_llm

        if is_llm(entry):
            return  # an LLM lives once per pod: its engine batches every request
        if self.dp.cache.predict_bytes(key) > self.max_bytes or not self.dp.cache.fits_without_eviction(entry.spec):
            return
        entry.extra = True
        self._loading.add(key)
        task = asyncio.ensure_future(self._load(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, key: str) -> None:
        cache = self.dp.cache
        try:
            entry = await cache.load(key)
            cap = cache.capacity_bytes
            if entry.size_bytes > self.max_bytes or (cap is not None and cache.used_bytes > cap):
                # Bigger than predicted: it could only stay by displacing single copies.
                await cache.drop(key)
                self._failed[key] = float("inf")
                log.info("worker %d: no room for a copy of %s here", self.router.index, key)
                return
            log.info("worker %d: serving a copy of hot model %s", self.router.index, key)
        except Exception as e:
            self._failed[key] = time.monotonic()
            log.warning("worker %d: a copy of %s did not load: %s", self.router.index, key, e)
        finally:
            self._loading.discard(key)

    async def sync(self, name: str, action: str, config: dict[str, Any] | None) -> None:
        """Replay a repository change made on the owner: drop this worker's copy; after a
        load, register the new settings (loaded here only once hot again); after an
        unload, stay unloaded as the owner is. A model never registered here (a folder the
        owner loaded by name) has no copy to drop."""
        repo = self.dp.repository
        try:
            if action == "unload":
                await repo.unload(name)
                return
            if config is not None:
                ms = repo.parse_config(name, config)
                old_uri = repo.registered_uri(name, ms.version)
                check_load_config(config, self.dp.settings, old_uri)  # as the owner did
                repo.register(ms if ms.uri else ms.model_copy(update={"uri": old_uri}))
            for key in repo.keys_of(name):
                await self.dp.cache.drop(key)
                self._failed.pop(key, None)
        except ModelNotFound:
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
