"""The composition root: the one place that builds a meshserve process.

settings -> executors, repository and cache -> data plane -> fleet -> fronts -> metrics,
each built once and handed to the next. No constructor builds its neighbours and no
module global carries wiring, so a test (or an embedding program) can build any part
alone with stand-ins, and every front of a process shares one FastAPI app, one registry.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshserve.protocol.errors import InferenceError
from meshserve.server.dataplane import DataPlane
from meshserve.server.llm.metrics import LLMMetrics, loaded_engines
from meshserve.server.load_executor import LoadExecutor
from meshserve.server.metrics import MeshCollector, load_time_histogram
from meshserve.server.observe import PhaseTimers, RequestMetrics
from meshserve.server.repository import ModelRepository
from meshserve.server.runtimes.base import Model
from meshserve.server.settings import Settings
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    import grpc
    from meshserve.server.workers import Router


@dataclass
class Process:
    """What one process serves: its data plane and its fronts (not yet bound to ports)."""

    settings: Settings
    dataplane: DataPlane
    registry: CollectorRegistry
    rest_app: Any  # the public ASGI app
    grpc_server: grpc.aio.Server
    # One of several workers: the REST app and gRPC server its peers forward to.
    peer_rest_app: Any = None
    peer_grpc_server: grpc.aio.Server | None = None


def build_dataplane(settings: Settings, registry: CollectorRegistry | None = None) -> DataPlane:
    """Executors, repository and cache, request metrics, the data plane and, with a
    store, its fleet (joined when the data plane starts)."""
    registry = registry if registry is not None else CollectorRegistry()
    executor = ThreadPoolExecutor(settings.predict_threads, thread_name_prefix="predict")
    # Loads and fetches on threads of their own: a stuck load never holds a predict thread.
    load_executor = LoadExecutor(settings.load_threads, name="load")
    repository = ModelRepository(settings, executor, load_executor)

    def known(name: str) -> bool:  # only registered names become metric labels
        try:
            return bool(repository.keys_of(name))
        except InferenceError:
            return False

    # Per-request figures (server/observe.py): counts, latency phases, in-flight, batch sizes.
    observe = RequestMetrics(registry, known)
    llm = LLMMetrics(registry, lambda: loaded_engines(repository.cache.entries()))

    def instrument(model: Model) -> PhaseTimers:
        engine = getattr(model, "engine", None)  # an LLM runtime's, once loaded
        if engine is not None:
            llm.attach(model.name, engine)
        return observe.phases(model.name)

    repository.instrument = instrument
    repository.cache.on_load = load_time_histogram(registry).observe
    dp = DataPlane(settings, repository, executor, load_executor, registry, observe)
    registry.register(MeshCollector(dp))
    if settings.store:
        from meshserve.modelmesh.store import open_store
        from meshserve.server.fleet import Fleet

        dp.join(Fleet(dp, settings, open_store(settings.store, settings.fleet_lease_seconds)))
    return dp


def build_process(settings: Settings, router: Router | None = None) -> Process:
    """The whole process; ``router``: one of several workers (server/workers.py)."""
    from meshserve.server.grpc.servicer import build_grpc_server
    from meshserve.server.rest.front import build_rest_app
    from meshserve.server.rest.routes import build_api

    dp = build_dataplane(settings)
    if router is not None:
        from meshserve.server.worker_copies import WorkerCopies

        dp.owns = router.mine
        dp.copies = router.copies = WorkerCopies(dp, router)  # hot models served by every worker
    api = build_api(dp)  # one FastAPI app (and one adapters mount) for every REST front
    max_bytes = settings.max_request_bytes
    process = Process(
        settings,
        dp,
        dp.metrics,
        build_rest_app(dp, api, max_bytes, router),
        build_grpc_server(dp, max_bytes, reuse_port=router is not None, router=router),
    )
    if router is not None:
        process.peer_rest_app = build_rest_app(dp, api, max_bytes)
        process.peer_grpc_server = build_grpc_server(dp, max_bytes, peer=True)
    return process
