"""Joining, leaving and closing; keeping the store's records in step with the cache.

Joining publishes this pod's registrations and learns the others'. While the pod runs,
each copy that becomes ready or goes away is written as a holder record (batched, in
order, retried while the store is away). Leaving (SIGTERM) hands the models only this
pod holds to other pods, the most recently used first, within 60% of the grace period,
then stops being a holder; requests already here finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from meshserve.modelmesh.cache import CacheEntry, ModelCache, ModelState
from meshserve.modelmesh.fleet.config import FleetConfig
from meshserve.modelmesh.fleet.copies import Copies
from meshserve.modelmesh.fleet.membership import Membership
from meshserve.modelmesh.store import CoordinationStore, StoreUnavailable

log = logging.getLogger(__name__)

HANDOFF_CONCURRENCY = 4
# A model's registration as the store keeps it, and how a pod takes one another pod made.
Describe = Callable[[CacheEntry], dict[str, Any]]
Register = Callable[[str, dict[str, Any]], None]


class Lifecycle:
    """``describe(entry)``: the registration document of a model; ``register(key, doc)``:
    register a model another pod registered (the server parses the document)."""

    def __init__(
        self,
        cache: ModelCache,
        store: CoordinationStore,
        members: Membership,
        copies: Copies,
        config: FleetConfig,
        describe: Describe,
        register: Register,
    ) -> None:
        self.cache = cache
        self.store = store
        self.members = members
        self.copies = copies
        self.config = config
        self.describe = describe
        self.register = register
        self._pending: dict[str, bool] = {}  # holder records to write: model -> held
        self._gone_used: dict[str, float] = {}  # last use of copies that went, for the store
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Join (raises StoreUnavailable), publish the registrations, follow the store."""
        view = self.members.view
        view.listeners.append(self.on_record)
        await self.store.start(self.members.pod)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect = self.republish
        self.cache.on_change = self.on_cache_change
        added = await self.store.register({e.key: self.describe(e) for e in self.cache.entries()})
        for key, doc in list(view.models.items()):  # registrations other pods made that this one lacks
            self._register_remote(key, doc)
        log.info("joined the fleet at %s as %s (%d pods, %d models, %d registered now)",
                 self.store.url, self.members.id, len(view.pods), len(view.models), added)  # fmt: skip
        self._tasks = [asyncio.ensure_future(self._writer()), asyncio.ensure_future(self.copies.run())]

    async def leave(self) -> None:
        """Stop taking loads, hand the models only this pod holds to others (hot ones
        first), then stop being a holder; requests already here finish."""
        members = self.members
        if members.leaving:
            return
        members.leaving = True
        members.pod.shutting_down = True
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(members.pod)
        budget = max(1.0, self.config.shutdown_grace_seconds * 0.6)
        hot = self.handoff_order()
        lonely = [e for e in hot if not members.other_holders(e.key)]
        slots = asyncio.Semaphore(HANDOFF_CONCURRENCY)

        async def handoff(entry: CacheEntry) -> None:
            async with slots:
                await self.copies.add(entry.key, why="hand-off")

        if lonely and self.store.connected:
            tasks = [asyncio.ensure_future(handoff(e)) for e in lonely]
            done, pending = await asyncio.wait(tasks, timeout=budget)
            for t in pending:
                t.cancel()
            log.info("handed off %d of %d models held only here", len(done), len(lonely))
        members.left = True
        with contextlib.suppress(StoreUnavailable):
            used = {e.key: e.last_used_wall() or 0.0 for e in hot}
            await self.store.set_holdings([(e.key, False) for e in hot], used)
        await asyncio.sleep(0.1)  # the other pods' views follow within milliseconds

    def handoff_order(self) -> list[CacheEntry]:
        """The models ready here, the most recently used first."""
        ready = [e for e in self.cache.resident_entries() if e.state is ModelState.READY]
        return sorted(ready, key=lambda e: e.last_used, reverse=True)

    async def close(self) -> None:
        """Deregister (the lease goes, and every record bound to it)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self.cache.on_change = None
        await self.store.close()

    # -- the store's records -----------------------------------------------------
    def _register_remote(self, key: str, doc: dict[str, Any]) -> None:
        if self.cache.get(key) is None:
            self.register(key, doc)

    def on_record(self, kind: str, key: str, present: bool) -> None:
        """A record changed in the store: holders (is this pod's copy an extra one?) or a
        registration made on another pod."""
        if kind == "holders":
            model = key.rpartition("/")[0]
            if self.cache.get(model) is not None:
                copies = self.members.view.holders_of(model)
                mine = copies.get(self.members.id)
                extra = mine is not None and any(r < mine for p, r in copies.items() if p != self.members.id)
                self.cache.set_extra(model, extra)
        elif kind == "models" and present:
            doc = self.members.view.models.get(key)
            if doc is not None:
                self._register_remote(key, doc)

    def on_cache_change(self, entry: CacheEntry) -> None:
        held = entry.state is ModelState.READY
        if held and self.members.left:
            return
        self._pending[entry.key] = held
        if not held and entry.last_used:
            self._gone_used[entry.key] = entry.last_used_wall() or 0.0
        self._wake.set()
        if held and entry.key not in self.members.view.models:  # registered here through the repository API
            asyncio.ensure_future(self._register_quietly({entry.key: self.describe(entry)}))

    async def _register_quietly(self, docs: dict[str, dict[str, Any]]) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.store.register(docs)

    async def _writer(self) -> None:
        """Holder records, written in batches, in order, retried while the store is away."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
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

    async def republish(self) -> None:
        """Back from a store outage with a new lease: every copy held here, again."""
        for entry in self.cache.resident_entries():
            if entry.state is ModelState.READY and not self.members.left:
                self._pending[entry.key] = True
        self._wake.set()
        self.copies.republish()
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish_pod(self.copies.stats())
