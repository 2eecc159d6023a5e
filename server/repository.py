"""The model repository: finds models, registers them in the cache, and gives
the cache its load function (URI -> loader -> runtime)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from loaders import is_remote, resolve_uri
from modelmesh import CacheEntry, ModelCache, ModelState, PlacementPolicy
from protocol.errors import InvalidInput, ModelLoadError, ModelNotFound
from server.capacity import default_capacity, files_size
from server.loaded_model import LoadedModel
from server.memory import release_free_memory, rss_bytes
from server.model_settings import ModelSettings, parse_model_settings, read_settings_file
from server.runtimes.base import Model
from server.runtimes.files import runtimes_for_dir
from server.runtimes.registry import resolve_runtime
from server.settings import Settings

log = logging.getLogger(__name__)
GC_AFTER_UNLOAD_BYTES = 32 * 1024 * 1024
TRIM_AFTER_FREED_BYTES = 8 * 1024 * 1024


def model_key(name: str, version: str | None) -> str:
    return f"{name}/{version}" if version else name


def _check_batching(model: Model) -> None:
    """``max_batch_size`` on a model that cannot take a batch dimension is a settings mistake."""
    if model.settings.max_batch_size > 1 and not model.supports_batching:
        raise ModelLoadError(
            f"model {model.name!r}: max_batch_size is {model.settings.max_batch_size} but its runtime "
            f"({type(model).__name__}) does not accept a batch dimension; remove max_batch_size"
        )


def _version_order(v: str) -> tuple[int, int, str]:
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


class ModelRepository:
    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor
        capacity = settings.capacity_bytes or default_capacity(settings.capacity_fraction)
        self.cache: ModelCache[LoadedModel] = ModelCache(
            self._load,
            self._unload,
            capacity_bytes=capacity,
            size_fn=self.predicted_size,
            policy=PlacementPolicy(min_churn_age=settings.min_churn_age_seconds),
            load_timeout=settings.load_timeout_seconds,
            retry_backoff=(settings.load_retry_seconds, settings.load_retry_max_seconds),
        )
        self._versions: dict[str, dict[str, str]] = {}  # name -> version ("" if none) -> key
        self._origin: dict[str, Path] = {}  # key -> directory its settings file came from
        self._disk_bytes: dict[str, int] = {}  # key -> bytes of its files, the size prediction
        self.fetcher = settings.fetcher()
        self._freed_since_trim = 0

    def predicted_size(self, ms: ModelSettings) -> int:
        """What a model will take once loaded, before it loads (ModelMesh's predictModelSize)."""
        disk = self._disk_bytes.get(model_key(ms.name, ms.version), 0)
        return max(disk, self.settings.default_model_bytes) + self.settings.model_overhead_bytes

    # -- discovery and registration -------------------------------------
    async def discover(self) -> list[str]:
        """Register every model in the model directory and the config; return their keys.
        Files are read on a worker thread, so the server answers while thousands register."""
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self._scan)
        return [self.register(ms, origin=origin, disk_bytes=disk) for ms, origin, disk in found]

    def _scan(self) -> list[tuple[ModelSettings, Path | None, int]]:
        found: list[tuple[ModelSettings, Path | None, int]] = []
        base = self.settings.model_dir
        if base is not None:
            if not base.is_dir():
                raise ValueError(f"model directory {base} does not exist")
            for child in sorted(base.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                try:
                    ms = self._settings_from_dir(child)
                except InvalidInput as e:
                    log.error("skipping %s: %s", child, e.message)
                    continue
                if ms is None:
                    log.warning("skipping %s: no model-settings file and no model file", child)
                    continue
                found.append((ms, child, files_size(child)))
        for doc in self.settings.models:
            ms = parse_model_settings(doc)
            if not ms.uri:
                raise ValueError(f"model {ms.name!r} in the config has no 'uri'")
            found.append((ms, None, self._disk_size_of(ms)))
        return found

    def _disk_size_of(self, ms: ModelSettings) -> int:
        """Bytes of a local model's files; remote ones are measured once fetched."""
        if not ms.uri or is_remote(ms.uri):
            return 0
        try:
            return files_size(resolve_uri(ms.uri, self.settings.model_dir))
        except ModelLoadError:
            return 0  # the load will say what is wrong

    def _settings_from_dir(self, path: Path) -> ModelSettings | None:
        doc = read_settings_file(path)
        if doc is None:
            if not runtimes_for_dir(path):
                return None
            doc = {}
        return parse_model_settings(doc, name=path.name, uri=str(path.resolve()))

    def register(self, ms: ModelSettings, origin: Path | None = None, disk_bytes: int | None = None) -> str:
        key = model_key(ms.name, ms.version)
        self.cache.register(key, ms, pinned=ms.pinned)
        self._versions.setdefault(ms.name, {})[ms.version or ""] = key
        if origin is not None:
            self._origin[key] = origin
        if disk_bytes is not None:
            self._disk_bytes[key] = disk_bytes
        return key

    # -- lookup -----------------------------------------------------------
    def resolve(self, name: str, version: str | None = None) -> str:
        """The cache key for a model name and optional version (latest if none)."""
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        if version:
            key = versions.get(version)
            if key is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r}")
            return key
        if len(versions) == 1:
            return next(iter(versions.values()))
        ready = [v for v, k in versions.items() if self.cache.get(k).state is ModelState.READY]  # type: ignore[union-attr]
        return versions[max(ready or versions, key=_version_order)]

    def versions_of(self, name: str) -> list[str]:
        return sorted((v for v in self._versions.get(name, {}) if v), key=_version_order)

    def entry(self, key: str) -> CacheEntry[LoadedModel]:
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} not found")
        return entry

    def keys_of(self, name: str) -> list[str]:
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        return list(versions.values())

    # -- repository extension ----------------------------------------------
    async def load(self, name: str, config: dict[str, Any] | None = None) -> None:
        """Load a model; with ``config``, (re)register it from that settings document.
        A model already serving is reloaded from its files and swapped on success."""
        if config is not None:
            if config.get("name", name) != name:
                raise InvalidInput(f"config names model {config.get('name')!r}, not {name!r}")
            ms = parse_model_settings(config, name=name)
            if not ms.uri:
                known = self._versions.get(name, {}).get(ms.version or "")
                old = self.cache.get(known).spec if known else None  # type: ignore[union-attr]
                if old is None or not old.uri:
                    raise InvalidInput(f"config for new model {name!r} needs a 'uri'")
                ms = ms.model_copy(update={"uri": old.uri})
            key = model_key(ms.name, ms.version)
            disk = await asyncio.get_running_loop().run_in_executor(self.executor, self._disk_size_of, ms)
            if self.cache.get(key) is None:
                self.register(ms, disk_bytes=disk)
            else:
                self._disk_bytes[key] = disk
            await self.cache.load(key, spec=ms)
            return
        for key in self.keys_of(name):
            entry = self.entry(key)
            spec = None
            if entry.state is ModelState.READY:
                spec = self._reread(key) or entry.spec
            await self.cache.load(key, spec=spec)

    def _reread(self, key: str) -> ModelSettings | None:
        origin = self._origin.get(key)
        return self._settings_from_dir(origin) if origin is not None and origin.is_dir() else None

    async def unload(self, name: str) -> None:
        for key in self.keys_of(name):
            await self.cache.unload(key)

    # -- the load function handed to the cache ------------------------------
    async def _load(self, ms: ModelSettings) -> tuple[LoadedModel, int]:
        loop = asyncio.get_running_loop()
        # One trip to a worker thread: resolve, import, build and, for a plain load(), load.
        work = loop.run_in_executor(self.executor, self._build_and_load, ms)
        try:
            model, size = await asyncio.shield(work)
        except asyncio.CancelledError:  # timed out: the thread cannot be stopped; unload when it ends
            work.add_done_callback(lambda f: self._discard(loop, f))
            raise
        if size is None:  # an async load(): run it on the loop
            before = rss_bytes()
            try:
                await model.load()
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(f"{type(e).__name__}: {e}") from e
            try:
                _check_batching(model)
            except ModelLoadError:
                done = model.unload()
                if inspect.isawaitable(done):
                    await done
                raise
            size = self._size_of(model, before)
        return LoadedModel(model, size), size

    def _build_and_load(self, ms: ModelSettings) -> tuple[Model, int | None]:
        path = self.fetcher.fetch(ms.uri, self.settings.model_dir) if ms.uri else None
        if path is not None and ms.uri and is_remote(ms.uri):
            self._disk_bytes[model_key(ms.name, ms.version)] = files_size(path)
        if path is not None and path.is_dir():
            # A settings file shipped with the model fills in what the registration left out.
            shipped = read_settings_file(path)
            if shipped:
                ms = parse_model_settings({**shipped, **ms.model_dump(include=ms.model_fields_set)})
        model = resolve_runtime(ms, path)(ms, path)
        if inspect.iscoroutinefunction(model.load):
            return model, None
        before = rss_bytes()
        try:
            model.load()
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{type(e).__name__}: {e}") from e
        try:
            _check_batching(model)
        except ModelLoadError:
            model.unload()
            raise
        return model, self._size_of(model, before)

    def _size_of(self, model: Model, rss_before: int) -> int:
        size = model.size_bytes()
        if size is None:  # nothing better: the process's growth, at least the prediction
            return max(rss_bytes() - rss_before, self.predicted_size(model.settings))
        # What the runtime counts (its tensors) plus what any model costs the interpreter.
        return int(size) + self.settings.model_overhead_bytes

    def _discard(self, loop: asyncio.AbstractEventLoop, work: asyncio.Future) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        model = work.result()[0]
        log.warning("model %s finished loading after its timeout; unloading it", model.name)
        loop.run_in_executor(self.executor, model.unload)

    async def _unload(self, handle: LoadedModel) -> None:
        model = handle.model
        if inspect.iscoroutinefunction(model.unload):
            await model.unload()
        else:
            await asyncio.get_running_loop().run_in_executor(self.executor, model.unload)
        size = handle.size_bytes
        del model, handle
        if size >= GC_AFTER_UNLOAD_BYTES:  # big models may hide in reference cycles; small ones free by refcount
            gc.collect()
        # Freed heap pages go back to the OS in batches: small models live on the heap
        # (below the mmap threshold) and a trim per eviction would cost more than it returns.
        self._freed_since_trim += size
        if self._freed_since_trim >= TRIM_AFTER_FREED_BYTES:
            self._freed_since_trim = 0
            await asyncio.get_running_loop().run_in_executor(self.executor, release_free_memory)
