"""The one data plane behind both fronts: REST and gRPC decode, call this, encode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from meshserve.modelmesh import CacheEntry, ModelState
from meshserve.protocol.errors import InferenceError, ServerNotReady
from meshserve.protocol.types import InferenceRequest, InferenceResponse, ModelMetadata
from meshserve.server.load_executor import LoadExecutor
from meshserve.server.load_policy import check_load_config
from meshserve.server.repository import ModelRepository
from meshserve.server.security import check_model_name, redact
from meshserve.server.settings import Settings
from meshserve.server.version import __version__

if TYPE_CHECKING:
    from meshserve.server.fleet import Fleet
    from meshserve.server.observe import RequestMetrics
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
PRELOAD_CONCURRENCY = 4


class DataPlane:
    """Built by the composition root (server/compose.py), which hands it its collaborators."""

    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        executor: Executor,
        load_executor: LoadExecutor,
        metrics: CollectorRegistry,
        observe: RequestMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.load_executor = load_executor
        self.repository = repository
        self.cache = repository.cache
        self.metrics = metrics  # the process's Prometheus registry
        self.observe = observe  # per-request figures, read by both fronts
        self._started = False
        self._draining = False
        self._stopping = False
        self._startup_keys: list[str] = []
        # Awaited on SIGTERM after readiness turns false and before the servers close
        # (e.g. deregistering from a fleet); each gets the grace period at most.
        self.drain_hooks: list[Callable[[], Awaitable[None]]] = []
        # Which models this process serves (all, unless it is one of several workers).
        self.owns: Callable[[str], bool] = lambda name: True
        self.fleet: Fleet | None = None  # set once the fleet handed to join() has started
        self._joining: Fleet | None = None
        self.copies = None  # meshserve.server.worker_copies.WorkerCopies when one of several workers

    def join(self, fleet: Fleet) -> None:
        """The fleet this data plane joins when it starts (with a coordination store)."""
        self._joining = fleet

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        """Register every configured model, then preload (pinned first) those that fit
        without evicting; the rest load on their first request. Failures are recorded."""
        started = time.monotonic()
        keys = await self.repository.discover()
        # Before any load (no await in between): start-up objects leave the collections unloads trigger.
        self.repository.reclaimer.settle()
        self._startup_keys = keys
        log.info("registered %d models in %.2fs", len(keys), time.monotonic() - started)
        if self._joining is not None:
            await self._join_fleet(self._joining)
        if self.settings.preload:
            entries = [e for e in (self.cache.get(k) for k in keys) if e is not None and self.owns(e.spec.name)]
            entries.sort(key=lambda e: not e.pinned)
            slots = asyncio.Semaphore(PRELOAD_CONCURRENCY)

            async def preload(entry: CacheEntry) -> None:
                async with slots:
                    if not entry.pinned and not self.cache.fits_without_eviction(entry.spec):
                        return
                    if not entry.pinned and self.fleet is not None:
                        return  # a fleet places models on first use
                    try:
                        await self.cache.load(entry.key)
                    except InferenceError as e:
                        log.error("%s", e.message)
                    except Exception:
                        log.exception("loading %s failed", entry.key)

            await asyncio.gather(*(preload(e) for e in entries))
        self._started = True

    async def _join_fleet(self, fleet: Fleet) -> None:
        from meshserve.modelmesh.store import StoreUnavailable

        try:
            await fleet.start()
        except StoreUnavailable as e:
            if not self.settings.store_fallback_local:
                raise OSError(f"{e} (set store_fallback_local to serve as a single pod instead)") from None
            log.warning("%s: serving as a single pod (store_fallback_local)", e)
            return
        self.fleet = fleet
        self.drain_hooks.append(self.leave)  # SIGTERM: hand this pod's models over first

    async def leave(self) -> None:
        """Before the listeners close at shutdown: in a fleet, hand this pod's models to
        other pods and stop being a holder; requests still arriving are forwarded."""
        if self.fleet is not None:
            try:
                await self.fleet.leave()
            except Exception:
                log.exception("leaving the fleet failed")

    async def stop(self) -> None:
        self._draining = self._stopping = True
        self.repository.cancel_loads()
        self.load_executor.shutdown(wait=False, cancel_futures=True)
        if self.fleet is not None:
            await self.fleet.close()
        await self.cache.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        """Readiness turns false; requests already on their way are still served."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def stopping(self) -> bool:
        """The listeners have closed: new work is refused (503)."""
        return self._stopping

    # -- health and metadata -------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self._started or self._draining:
            return False
        if not self.settings.strict_readiness:
            return True
        # The models configured at start must have loaded (Triton's strict readiness);
        # one added later through the repository API that fails does not take the pod out.
        entries = (self.cache.get(k) for k in self._startup_keys)
        entries = (e for e in entries if e is None or self.owns(e.spec.name))
        return all(e is not None and e.state is not ModelState.FAILED for e in entries)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.settings.server_name, "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        entry = self.repository.entry(self.repository.resolve(name, version))
        if self.fleet is not None and entry.state is not ModelState.READY:
            return self.fleet.ready_elsewhere(entry.key)  # a copy on another pod serves it
        return entry.state is ModelState.READY

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        entry = self.repository.entry(self.repository.resolve(name, version))
        meta = entry.handle.metadata if entry.handle is not None else entry.spec.metadata()
        return ModelMetadata(
            name=name,
            versions=self.repository.versions_of(name),
            platform=meta.platform,
            inputs=meta.inputs,
            outputs=meta.outputs,
            parameters=meta.parameters,
        )

    # -- inference -----------------------------------------------------------
    def infer(self, request: InferenceRequest, key: str | None = None) -> Awaitable[InferenceResponse]:
        """``key``: the model's cache key when the front already resolved it. Not a coroutine
        itself (one frame fewer per request): a refusal raises at the call, in the caller's
        ``await``."""
        if self._stopping:
            raise ServerNotReady("server is shutting down")
        if key is None:
            key = self.repository.resolve(request.model_name, request.model_version)
        if self.fleet is not None:
            return self.fleet.infer(request, key)
        return self.local_infer(request, key)

    async def local_infer(self, request: InferenceRequest, key: str) -> InferenceResponse:
        """Serve on this pod (there is no fleet, or the fleet decided so)."""
        cache = self.cache
        entry = cache.hit(key)
        if entry is None:  # not resident: load it (or wait for its load) under a lease
            async with cache.acquire(key) as model:
                return await model.infer(request, self.executor)
        try:
            response = await entry.handle.infer(request, self.executor)
        except BaseException:
            cache.release(entry, True)
            raise
        cache.release(entry, False)
        return response

    # -- repository extension ------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows = self._registered_rows(ready_only)
        if not ready_only:  # folders on disk a load would register (Triton lists them UNAVAILABLE)
            rows += [
                {"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason, "size_bytes": 0,
                 "last_used": None, "pinned": False, "requests": 0}
                for name, reason in self.repository.unregistered_folders()
            ]  # fmt: skip
        return rows

    def _registered_rows(self, ready_only: bool) -> list[dict[str, Any]]:
        if self.fleet is not None:  # every model of the fleet, where its copies are
            return self.fleet.index_rows(ready_only)
        rows = []
        for entry in self.cache.entries():
            if ready_only and entry.state is not ModelState.READY:
                continue
            spec = entry.spec
            rows.append(
                {
                    "name": spec.name,
                    "version": spec.version or "",
                    "state": entry.state.value,
                    "reason": redact(entry.reason) if entry.reason else entry.reason,
                    "size_bytes": entry.size_bytes,
                    "last_used": entry.last_used_wall(),
                    "pinned": entry.pinned,
                    "requests": entry.requests,
                }
            )
        return rows

    async def load_model(self, name: str, config: dict[str, Any] | None = None) -> None:
        check_model_name(name)
        if config is not None:
            ms = self.repository.parse_config(name, config)
            check_load_config(config, self.settings, self.repository.registered_uri(name, ms.version))
        await self.repository.load(name, config)

    async def unload_model(self, name: str) -> None:
        check_model_name(name)
        await self.repository.unload(name)
