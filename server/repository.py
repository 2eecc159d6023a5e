"""The model repository: finds models, registers them in the cache, and gives
the cache its load function (URI -> loader -> runtime)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshserve.loaders import is_remote, resolve_uri
from meshserve.loaders.limits import LoadCancelled
from meshserve.modelmesh import CacheEntry, ModelCache, ModelState, PlacementPolicy
from meshserve.modelmesh.registry import ModelRegistry, model_key
from meshserve.protocol.errors import Forbidden, InvalidInput, ModelLoadError, ModelNotFound
from meshserve.server.capacity import default_capacity, files_size
from meshserve.server.load_policy import check_load_config
from meshserve.server.loaded_model import LoadedModel
from meshserve.server.memory import reachable_bytes, rss_bytes
from meshserve.server.model_settings import SETTINGS_FILES, ModelSettings, parse_model_settings, read_settings_file
from meshserve.server.reclaim import MemoryReclaimer
from meshserve.server.runtimes.base import Model
from meshserve.server.runtimes.files import runtimes_for_dir
from meshserve.server.runtimes.registry import resolve_runtime
from meshserve.server.security import check_model_name
from meshserve.server.settings import Settings

if TYPE_CHECKING:
    from meshserve.server.observe import PhaseTimers

log = logging.getLogger(__name__)
# A repository index looks at this many folders of --model-dir for models not registered.
MAX_INDEXED_FOLDERS = 10_000


def _load_error(e: Exception) -> ModelLoadError:
    """A runtime's load failure as the error the cache records (its own errors as they are)."""
    return e if isinstance(e, ModelLoadError) else ModelLoadError(f"{type(e).__name__}: {e}")


def _check_batching(model: Model) -> None:
    """``max_batch_size`` on a model that cannot take a batch dimension is a settings mistake."""
    if model.settings.max_batch_size > 1 and not model.supports_batching:
        raise ModelLoadError(
            f"model {model.name!r}: max_batch_size is {model.settings.max_batch_size} but its runtime "
            f"({type(model).__name__}) does not accept a batch dimension; remove max_batch_size"
        )


def _warn_if_one_model(base: Path) -> None:
    """``--model-dir`` names the folder that holds one folder per model; a model's own folder
    there serves nothing, silently, so say what to pass instead."""
    settings = [f for f in SETTINGS_FILES if (base / f).is_file()]
    held = settings[0] if settings else ", ".join(f"{r} model files" for r in runtimes_for_dir(base))
    if held:
        log.warning(
            "--model-dir %s looks like one model's folder (it holds %s), not a folder of model folders: "
            "pass its parent, --model-dir %s, to serve it as model %r",
            base, held, base.resolve().parent, base.resolve().name,
        )  # fmt: skip


def _read_settings_doc(folder: Path) -> dict[str, Any]:
    """A folder's settings document for a load over the API: a broken file is the client's 400."""
    try:
        doc = read_settings_file(folder)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"the model-settings file in folder {folder.name!r} cannot be read: {e}") from None
    except Exception as e:  # yaml.YAMLError, without importing yaml here
        raise InvalidInput(f"the model-settings file in folder {folder.name!r} is not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InvalidInput(f"the model-settings file in folder {folder.name!r} must hold an object")
    return doc


class ModelRepository:
    def __init__(self, settings: Settings, executor: Executor, load_executor: Executor | None = None) -> None:
        self.settings = settings
        self.executor = executor
        # Loads and fetches run here, apart from predict (the data plane gives each its own).
        self.load_executor = load_executor or executor
        self._cancels: set[threading.Event] = set()
        capacity = settings.capacity_bytes or default_capacity(settings.capacity_fraction)
        self.cache: ModelCache[LoadedModel] = ModelCache(
            self._load,
            self._unload,
            capacity_bytes=capacity,
            size_fn=self.predicted_size,
            policy=PlacementPolicy(min_churn_age=settings.min_churn_age_seconds),
            load_timeout=settings.load_timeout_seconds,
            retry_backoff=(settings.load_retry_seconds, settings.load_retry_max_seconds),
            capacity_wait=settings.capacity_wait_seconds,
        )
        self.registry = ModelRegistry()
        self.fetcher = settings.fetcher()
        # Metrics for each model that loads: returns its phase timers (and may hook its
        # engine's); set by the composition root.
        self.instrument: Callable[[Model], PhaseTimers | None] | None = None
        # What unloads free goes back in batches (cycles collected, heap trimmed).
        self.reclaimer = MemoryReclaimer(executor, capacity)

    def predicted_size(self, ms: ModelSettings) -> int:
        """What a model will take once loaded, before it loads (ModelMesh's predictModelSize):
        only placement and the load's reservation use it; the load measures the real size."""
        reg = self.registry.get(model_key(ms.name, ms.version))
        disk = reg.disk_bytes if reg is not None else 0
        return max(disk, self.settings.default_model_bytes) * _copies(ms) + self.settings.model_overhead_bytes

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
            _warn_if_one_model(base)
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
        reg = self.registry.add(ms.name, ms.version, ms, origin)
        if disk_bytes is not None:
            reg.disk_bytes = disk_bytes
        self.cache.register(reg.key, ms, pinned=ms.pinned)
        return reg.key

    # -- lookup -----------------------------------------------------------
    def resolve(self, name: str, version: str | None = None) -> str:
        """The cache key for a model name and optional version (latest if none)."""
        return self.registry.resolve(name, version, self._is_ready)

    def _is_ready(self, key: str) -> bool:
        entry = self.cache.get(key)
        return entry is not None and entry.state is ModelState.READY

    def versions_of(self, name: str) -> list[str]:
        return self.registry.versions(name)

    def entry(self, key: str) -> CacheEntry[LoadedModel]:
        entry = self.cache.get(key)
        if entry is None:
            raise ModelNotFound(f"model {key!r} not found")
        return entry

    def keys_of(self, name: str) -> list[str]:
        return self.registry.keys(name)

    # -- repository extension ----------------------------------------------
    async def load(self, name: str, config: dict[str, Any] | None = None) -> None:
        """Load a model; with ``config``, (re)register it from that settings document.
        A model already serving is reloaded from its files and swapped on success."""
        if config is not None:
            ms = self.parse_config(name, config)
            if not ms.uri:
                known = self.registry.get(model_key(name, ms.version))
                old = known.spec if known else None
                if old is None or not old.uri:
                    raise InvalidInput(f"config for new model {name!r} needs a 'uri'")
                ms = ms.model_copy(update={"uri": old.uri})
            key = model_key(ms.name, ms.version)
            disk = await asyncio.get_running_loop().run_in_executor(self.executor, self._disk_size_of, ms)
            self.register(ms, disk_bytes=disk)
            await self.cache.load(key, spec=ms)
            return
        if not self._by_name(name):
            await self.register_new_folder(name)
        for key in self.keys_of(name):
            entry = self.entry(key)
            spec = None
            if entry.state is ModelState.READY:
                spec = self._reread(key) or entry.spec
            await self.cache.load(key, spec=spec)

    def _by_name(self, name: str) -> bool:
        try:
            return bool(self.keys_of(name))
        except ModelNotFound:
            return False

    async def register_new_folder(self, name: str) -> None:
        """Triton's explicit model control: a folder that appeared directly under --model-dir
        after start is registered by its name. Its settings file meets the same load policy as
        a client's config (server/load_policy.py): it arrived while the server ran."""
        loop = asyncio.get_running_loop()
        folder = await loop.run_in_executor(self.executor, self._new_folder, name)
        doc = await loop.run_in_executor(self.executor, _read_settings_doc, folder)
        check_load_config({**doc, "uri": str(folder)}, self.settings)
        ms = await loop.run_in_executor(self.executor, self._settings_from_dir, folder)
        if ms is None:
            raise InvalidInput(f"folder {name!r} in the model directory has no model-settings file and no model file")
        if ms.name != name:
            raise InvalidInput(f"folder {name!r} holds a model-settings file that names model {ms.name!r}")
        if not self._by_name(name):  # a concurrent load of the same folder registered it first
            self.register(ms, origin=folder, disk_bytes=await loop.run_in_executor(self.executor, files_size, folder))
            log.info("registered model %s from %s (explicit load)", name, folder)

    def _new_folder(self, name: str) -> Path:
        """``name``'s folder directly under the model directory, resolved inside it."""
        base = self.settings.model_dir
        missing = ModelNotFound(
            f"model {name!r} not found"
            + (f" (and no folder {name!r} in the model directory {base})" if base is not None else "")
        )
        if base is None:
            raise missing
        root = Path(base).resolve()
        folder = (root / name).resolve()
        if folder.parent != root:  # a symlink out of the model directory
            raise Forbidden(f"folder {name!r} resolves outside the model directory (--model-dir)")
        if not folder.is_dir():
            raise missing
        return folder

    def unregistered_folders(self) -> list[tuple[str, str]]:
        """Folders directly under --model-dir that name no registered model, with why:
        what a repository index lists as UNAVAILABLE (Triton lists such models too)."""
        base = self.settings.model_dir
        if base is None:
            return []
        rows = []
        try:
            children = sorted(Path(base).iterdir())
        except OSError:
            return []
        for child in children[:MAX_INDEXED_FOLDERS]:
            name = child.name
            if name.startswith(".") or not child.is_dir() or self._by_name(name):
                continue
            try:
                check_model_name(name)
            except InvalidInput:
                continue
            if not any((child / f).is_file() for f in SETTINGS_FILES) and not runtimes_for_dir(child):
                reason = "no model-settings file and no model file in this folder"
            else:
                reason = f"not loaded: appeared after start; POST /v2/repository/models/{name}/load loads it"
            rows.append((name, reason))
        return rows

    @staticmethod
    def parse_config(name: str, config: dict[str, Any]) -> ModelSettings:
        """A load's settings document, validated (400s come before any policy check)."""
        if config.get("name", name) != name:
            raise InvalidInput(f"config names model {config.get('name')!r}, not {name!r}")
        return parse_model_settings(config, name=name)

    def registered_uri(self, name: str, version: str | None = None) -> str | None:
        """The uri a registered model loads from (None for an unknown model)."""
        reg = self.registry.get(model_key(name, version if isinstance(version, str) else None))
        return reg.spec.uri if reg is not None else None

    def _reread(self, key: str) -> ModelSettings | None:
        reg = self.registry.get(key)
        origin = reg.origin if reg is not None else None
        return self._settings_from_dir(origin) if origin is not None and origin.is_dir() else None

    async def unload(self, name: str) -> None:
        for key in self.keys_of(name):
            await self.cache.unload(key)

    # -- the load function handed to the cache ------------------------------
    async def _load(self, ms: ModelSettings) -> tuple[LoadedModel, int]:
        loop = asyncio.get_running_loop()
        # One trip to a load thread: fetch, import, build and, for a plain load(), load.
        cancel = threading.Event()
        self._cancels.add(cancel)
        work = loop.run_in_executor(self.load_executor, self._build_and_load, ms, cancel)
        work.add_done_callback(lambda _: self._cancels.discard(cancel))
        try:
            model, size = await asyncio.shield(work)
        except asyncio.CancelledError:
            # Timed out: a fetch stops at its next chunk or archive member; a runtime's own
            # load() cannot be stopped, so what it returns is unloaded when it ends.
            cancel.set()
            work.add_done_callback(lambda f: self._discard(loop, f))
            raise
        if size is None:  # an async load(): run it on the loop
            before = rss_bytes()
            try:
                await model.load()
            except Exception as e:
                raise _load_error(e)  # noqa: B904 - the original stays as __context__
            size = self._size_of(model, before)
        timers = self.instrument(model) if self.instrument is not None else None
        return LoadedModel(model, size, timers), size

    def cancel_loads(self) -> None:
        """Tell every load in progress to stop (at shutdown): fetches end at their next chunk."""
        for cancel in list(self._cancels):
            cancel.set()

    def _build_and_load(self, ms: ModelSettings, cancel: threading.Event) -> tuple[Model, int | None]:
        path = self.fetcher.fetch(ms.uri, self.settings.model_dir, cancel=cancel) if ms.uri else None
        if cancel.is_set():
            raise LoadCancelled(f"loading model {ms.name!r} was cancelled (timed out or the server is stopping)")
        reg = self.registry.get(model_key(ms.name, ms.version))
        if path is not None and ms.uri and is_remote(ms.uri) and reg is not None:
            reg.disk_bytes = files_size(path)  # fetched: now its files tell its size
        if path is not None and path.is_dir():
            # A settings file shipped with the model fills in what the registration left out.
            shipped = read_settings_file(path)
            if shipped:
                ms = parse_model_settings({**shipped, **ms.model_dump(include=ms.model_fields_set)})
        model = resolve_runtime(ms, path)(ms, path)
        _check_batching(model)  # a settings mistake: say so before loading anything
        if inspect.iscoroutinefunction(model.load):
            return model, None
        before = rss_bytes()
        try:
            model.load()
        except Exception as e:
            raise _load_error(e)  # noqa: B904 - the original stays as __context__
        return model, self._size_of(model, before)

    def _size_of(self, model: Model, rss_before: int) -> int:
        """What the model holds plus what it costs beyond that: its code, objects and allocator
        slack, which a runtime's figure (its tensors) leaves out and a measurement counts in part."""
        size = model.size_bytes()
        if size is None:
            return self._measured_size(model, rss_before) + self.settings.measured_overhead_bytes
        return int(size) + self.settings.model_overhead_bytes

    def _measured_size(self, model: Model, rss_before: int) -> int:
        """A model that does not report its size: the objects and arrays it reaches, at
        least its files (what it was loaded from; memory a C extension keeps outside Python
        objects shows there). Not the RSS delta: loads on other threads, requests and
        reused heap pages make it count too much or nothing."""
        reg = self.registry.get(model_key(model.settings.name, model.settings.version))
        disk = reg.disk_bytes if reg is not None else 0
        held = reachable_bytes(model)
        log.debug(
            "model %s holds %d bytes (files %d, process grew %d)", model.name, held, disk, rss_bytes() - rss_before
        )
        return max(held, disk)

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
        await self.reclaimer.unloaded(size)


def _copies(ms: ModelSettings) -> int:
    """Copies of the weights a load makes: an LLM engine's ``data_parallel_size`` (each replica
    a process with its own), so the reservation covers them before the processes start. A value
    the engine refuses counts as one (the load fails anyway)."""
    try:
        n = int(ms.parameters.get("data_parallel_size", 1))
    except (TypeError, ValueError, AttributeError):
        return 1
    return max(n, 1)
