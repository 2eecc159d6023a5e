"""The periodic work: this pod's record in the store, and more copies of busy models.

ModelMesh's copy rules: a model used again ``second_copy_after_seconds`` after it was
loaded gets a second copy; one serving more than ``copy_rate_per_minute`` gets another,
up to ``max_copies``. The copy goes to the best pod that lacks one (ModelMesh's order);
an extra copy is evicted before any single copy (the cache's ``extra`` flag).
"""

from __future__ import annotations

import asyncio
import logging
import time

from meshserve.modelmesh.cache import ModelCache, ModelState
from meshserve.modelmesh.fleet.config import FleetConfig
from meshserve.modelmesh.fleet.membership import Membership
from meshserve.modelmesh.fleet.transport import Transport, Unreachable, cancelled_here
from meshserve.modelmesh.placement import rank_pods
from meshserve.modelmesh.store import CoordinationStore, PodRecord, StoreUnavailable
from meshserve.protocol.errors import InferenceError

log = logging.getLogger(__name__)


class Copies:
    def __init__(
        self,
        cache: ModelCache,
        store: CoordinationStore,
        members: Membership,
        transport: Transport,
        config: FleetConfig,
    ) -> None:
        self.cache = cache
        self.store = store
        self.members = members
        self.transport = transport
        self.config = config
        self._last_requests: dict[str, int] = {}
        self._tried: dict[str, float] = {}  # model -> monotonic time before which no new copy is tried
        self._tick_at = time.monotonic()
        self._published: tuple = ()

    def setting(self, name: str) -> float:
        """A dynamic setting from the store, else this pod's."""
        value = self.members.view.settings.get(name)
        return float(value) if isinstance(value, (int, float)) else float(getattr(self.config, name))

    def stats(self) -> PodRecord:
        """This pod's record, brought up to date from the cache."""
        pod = self.members.pod
        resident = self.cache.resident_entries()
        pod.used = self.cache.used_bytes
        pod.models = len(resident)
        pod.oldest_lru = (resident[0].last_used_wall() or 0.0) if resident else 0.0
        pod.loading = self.cache.loading
        return pod

    def republish(self) -> None:
        """The store lost the record (a new lease): write it on the next tick."""
        self._published = ()

    async def run(self) -> None:
        interval = self.config.tick_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("fleet tick failed")

    async def tick(self) -> list[asyncio.Task]:
        """One round: copies for the models that earned one (started, not awaited), then the
        pod record, written only when it changed (the lease keeps it alive: an idle fleet
        writes nothing). Returns the copies started."""
        now = time.monotonic()
        dt = max(1e-3, now - self._tick_at)
        self._tick_at = now
        threshold = self.setting("copy_rate_per_minute")
        second_after = self.setting("second_copy_after_seconds")
        max_copies = int(self.setting("max_copies"))
        total = 0.0
        last = self._last_requests
        wall = time.time()
        started = []
        for entry in self.cache.resident_entries():
            before = last.get(entry.key, entry.requests)
            last[entry.key] = entry.requests
            delta = entry.requests - before
            if delta <= 0 or entry.state is not ModelState.READY or self.members.leaving:
                continue
            rate = delta / dt * 60.0
            total += rate
            copies = len(self.members.holders(entry.key))
            if copies >= max_copies or now < self._tried.get(entry.key, 0.0):
                continue
            if rate > threshold or (
                copies <= 1 and entry.loaded_at is not None and wall - entry.loaded_at >= second_after
            ):
                self._tried[entry.key] = now + max(5.0, min(60.0, second_after))
                why = "request rate" if rate > threshold else "used again"
                started.append(asyncio.ensure_future(self.add(entry.key, why=why)))
        pod = self.stats()
        pod.rate = round(total)
        shown = (pod.used, pod.models, round(pod.oldest_lru), pod.loading, pod.rate, pod.shutting_down)
        if self.store.connected and shown != self._published:
            await self.store.publish_pod(pod)
            self._published = shown
        return started

    async def add(self, key: str, why: str) -> bool:
        """Load one more copy of ``key`` on the best other pod that lacks one (two tries)."""
        members = self.members
        holders = members.view.holders_of(key)
        need = self.cache.predict_bytes(key) if self.cache.get(key) is not None else 0
        candidates = [p for p in members.live_pods() if p.id != members.id and p.id not in holders]
        for pod in rank_pods(candidates, need)[:2]:
            try:
                await self.transport.load(pod, key, self.config.forward_timeout_seconds)
                log.info("copy of %s loaded on %s (%s)", key, pod.id, why)
                return True
            except Unreachable as e:
                members.suspect(pod.id)
                log.info("copy of %s on %s failed: %s", key, pod.id, e)
            except InferenceError as e:
                log.info("copy of %s on %s failed: %s", key, pod.id, e.message)
            except asyncio.CancelledError:
                if cancelled_here():
                    raise
        return False
