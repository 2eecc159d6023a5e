"""Joining, leaving (hand-off) and closing; the store's records and the holder writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from meshserve.modelmesh import CacheEntry, ModelState
from meshserve.modelmesh.store import StoreUnavailable
from meshserve.protocol.errors import InferenceError

log = logging.getLogger(__package__)  # "meshserve.server.fleet", as before the split

HANDOFF_CONCURRENCY = 4


class Lifecycle:
    """Part of :class:`meshserve.server.fleet.Fleet` (its state is set in ``Fleet.__init__``)."""

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Join (raises StoreUnavailable), publish the registrations, follow the store."""
        self.view.listeners.append(self._on_record)
        await self.store.start(self.pod)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect = self._republish
        self.cache.on_change = self._on_cache_change
        docs = {}
        for entry in self.cache.entries():
            docs[entry.key] = entry.spec.model_dump(mode="json", exclude_defaults=True)
        added = await self.store.register(docs)
        # Registrations other pods made that this one lacks.
        for key, doc in list(self.view.models.items()):
            self._register_remote(key, doc)
        log.info("joined the fleet at %s as %s (%d pods, %d models, %d registered now)",
                 self.store.url, self.id, len(self.view.pods), len(self.view.models), added)  # fmt: skip
        self._tasks = [asyncio.ensure_future(self._writer()), asyncio.ensure_future(self._ticker())]

    async def leave(self) -> None:
        """SIGTERM: stop taking loads, hand the models only this pod holds to others (hot
        ones first), then stop being a holder; requests already here finish."""
        if self.leaving:
            return
        self.leaving = True
        self.pod.shutting_down = True
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(self.pod)
        budget = max(1.0, self.settings.shutdown_grace_seconds * 0.6)
        hot = sorted(
            (e for e in list(self.cache._lru.values()) if e.state is ModelState.READY),
            key=lambda e: e.last_used,
            reverse=True,
        )
        lonely = [e for e in hot if not self._other_holders(e.key)]
        slots = asyncio.Semaphore(HANDOFF_CONCURRENCY)

        async def handoff(entry: CacheEntry) -> None:
            async with slots:
                await self._add_copy(entry.key, why="hand-off")

        if lonely and self.store.connected:
            tasks = [asyncio.ensure_future(handoff(e)) for e in lonely]
            done, pending = await asyncio.wait(tasks, timeout=budget)
            for t in pending:
                t.cancel()
            log.info("handed off %d of %d models held only here", len(done), len(lonely))
        self.left = True
        with contextlib.suppress(StoreUnavailable):
            used = {e.key: e.last_used_wall() or 0.0 for e in hot}
            await self.store.set_holdings([(e.key, False) for e in hot], used)
        await asyncio.sleep(0.1)  # the other pods' views follow within milliseconds

    async def close(self) -> None:
        """Deregister (the lease goes, and every record bound to it) and close channels."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self.cache.on_change = None
        await self.store.close()
        for channel, _ in self._channels.values():
            await channel.close()

    # -- the store's records ---------------------------------------------------
    def _register_remote(self, key: str, doc: dict[str, Any]) -> None:
        if self.cache.get(key) is not None:
            return
        from meshserve.server.model_settings import parse_model_settings

        try:
            self.dp.repository.register(parse_model_settings(doc))
        except InferenceError as e:
            log.warning("fleet registration %s ignored: %s", key, e.message)

    def _on_record(self, kind: str, key: str, present: bool) -> None:
        if kind == "holders":
            model = key.rpartition("/")[0]
            entry = self.cache.get(model)
            if entry is not None:
                copies = self.view.holders_of(model)
                mine = copies.get(self.id)
                entry.extra = mine is not None and any(r < mine for p, r in copies.items() if p != self.id)
        elif kind == "models" and present:
            doc = self.view.models.get(key)
            if doc is not None:
                self._register_remote(key, doc)

    def _on_cache_change(self, entry: CacheEntry) -> None:
        held = entry.state is ModelState.READY
        if held and self.left:
            return
        self._pending[entry.key] = held
        if not held and entry.last_used:
            self._gone_used[entry.key] = entry.last_used_wall() or 0.0
        self._wake.set()
        if held and entry.key not in self.view.models:  # registered here through the repository API
            doc = entry.spec.model_dump(mode="json", exclude_defaults=True)
            asyncio.ensure_future(self._register_quietly({entry.key: doc}))

    async def _register_quietly(self, docs: dict[str, dict[str, Any]]) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.register(docs)

    async def _writer(self) -> None:
        """Holder records, written in batches, in order, retried while etcd is away."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.items())[:64]
                for k, _ in batch:
                    del self._pending[k]
                used = {k: self._gone_used.pop(k) for k, held in batch if not held and k in self._gone_used}
                try:
                    await self.store.set_holdings(batch, used)
                except StoreUnavailable:
                    for k, held in batch:
                        self._pending.setdefault(k, held)
                    for k, when in used.items():
                        self._gone_used.setdefault(k, when)
                    await asyncio.sleep(0.5)
                except Exception:
                    log.exception("writing holder records failed")
                    await asyncio.sleep(0.5)

    async def _republish(self) -> None:
        """Back from an etcd outage with a new lease: every copy held here, again."""
        for entry in list(self.cache._lru.values()):
            if entry.state is ModelState.READY and not self.left:
                self._pending[entry.key] = True
        self._wake.set()
        self._published = ()
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(self._stats())
