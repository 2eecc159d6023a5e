"""The periodic work: the pod record and the copy rules (more copies of busy models)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from meshserve.modelmesh import ModelState
from meshserve.modelmesh.placement import rank_pods
from meshserve.modelmesh.store import PodRecord, StoreUnavailable
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.server.fleet.wire import _cancelled_here, _remote_error, _Unreachable, store_lease

log = logging.getLogger(__package__)  # "meshserve.server.fleet", as before the split


class Copies:
    """Part of :class:`meshserve.server.fleet.Fleet` (its state is set in ``Fleet.__init__``)."""

    # -- the periodic work: the pod record and the copy rules -------------------
    def _stats(self) -> PodRecord:
        pod = self.pod
        lru = self.cache._lru
        pod.used = self.cache.used_bytes
        pod.models = len(lru)
        head = next(iter(lru.values()), None)
        pod.oldest_lru = (head.last_used_wall() or 0.0) if head is not None else 0.0
        pod.loading = sum(1 for e in self.cache._entries.values() if e.state is ModelState.LOADING)
        return pod

    def setting(self, name: str) -> float:
        """A dynamic setting from the store, else this pod's."""
        value = self.view.settings.get(name)
        return float(value) if isinstance(value, (int, float)) else float(getattr(self.settings, name))

    async def _ticker(self) -> None:
        interval = min(1.0, store_lease(self.store, self.settings) / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("fleet tick failed")

    async def _tick(self) -> None:
        now = time.monotonic()
        dt = max(1e-3, now - self._tick_at)
        self._tick_at = now
        threshold = self.setting("copy_rate_per_minute")
        second_after = self.setting("second_copy_after_seconds")
        max_copies = int(self.setting("max_copies"))
        total = 0.0
        last = self._last_requests
        wall = time.time()
        for entry in list(self.cache._lru.values()):
            before = last.get(entry.key, entry.requests)
            last[entry.key] = entry.requests
            delta = entry.requests - before
            if delta <= 0 or entry.state is not ModelState.READY or self.leaving:
                continue
            rate = delta / dt * 60.0
            total += rate
            copies = len(self._live_holders(entry.key, include_self=True))
            if copies >= max_copies or now < self._copy_tried.get(entry.key, 0.0):
                continue
            if rate > threshold or (
                copies <= 1 and entry.loaded_at is not None and wall - entry.loaded_at >= second_after
            ):
                self._copy_tried[entry.key] = now + max(5.0, min(60.0, second_after))
                why = "request rate" if rate > threshold else "used again"
                asyncio.ensure_future(self._add_copy(entry.key, why=why))
        pod = self._stats()
        pod.rate = round(total)
        # Written only when it changed (the lease keeps it alive): an idle fleet writes nothing.
        shown = (pod.used, pod.models, round(pod.oldest_lru), pod.loading, pod.rate, pod.shutting_down)
        if self.store.connected and shown != self._published:
            await self.store.publish_pod(pod)
            self._published = shown

    async def _add_copy(self, key: str, why: str) -> bool:
        """Load one more copy of ``key`` on the best other pod that lacks one."""
        holders = self.view.holders_of(key)
        entry = self.cache.get(key)
        need = self.cache._predict(entry, entry.spec) if entry is not None else 0
        candidates = [
            p for p in self.view.pods.values() if p.id != self.id and p.id not in holders and self._alive(p.id)
        ]
        for pod in rank_pods(candidates, need)[:2]:
            try:
                _, stub = self._stub(pod)
                await stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=key),
                    timeout=self.settings.forward_timeout_seconds,
                    metadata=self._metadata["copy"],
                )
                log.info("copy of %s loaded on %s (%s)", key, pod.id, why)
                return True
            except grpc.aio.AioRpcError as e:
                err = _remote_error(e)
                if isinstance(err, _Unreachable):
                    self._mark_suspect(pod.id)
                log.info("copy of %s on %s failed: %s", key, pod.id, err)
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise
        return False
