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
    from meshserve.server.fleet import Fleet
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
        dp.join(build_fleet(dp, settings))
    return dp


def build_fleet(dp: DataPlane, settings: Settings) -> Fleet:
    """The mesh across pods: the store, this pod's membership, the transport (gRPC and HTTP), and the
    router, copies and lifecycle that decide with them (meshserve.modelmesh.fleet)."""
    from meshserve.modelmesh.fleet import Copies, FleetConfig, Lifecycle, Membership, Router
    from meshserve.modelmesh.store import open_store
    from meshserve.server.fleet import Fleet
    from meshserve.server.fleet.core import describe, registrar
    from meshserve.server.fleet.transport import PodTransport
    from meshserve.server.fleet.wire import auth_metadata, pod_record, store_lease

    store = open_store(settings.store, settings.fleet_lease_seconds)
    config = FleetConfig(
        lease_seconds=store_lease(store, settings),
        forward_timeout_seconds=settings.forward_timeout_seconds,
        capacity_wait_seconds=settings.capacity_wait_seconds,
        load_retry_max_seconds=settings.load_retry_max_seconds,
        load_timeout_seconds=settings.load_timeout_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        second_copy_after_seconds=settings.second_copy_after_seconds,
        copy_rate_per_minute=settings.copy_rate_per_minute,
        max_copies=settings.max_copies,
    )
    cache = dp.cache
    transport = PodTransport(settings.max_request_bytes, settings.forward_timeout_seconds, auth_metadata(settings))
    members = Membership(store.view, pod_record(settings, cache.capacity_bytes), config.suspect_seconds,
                         transport.forget)  # fmt: skip
    router = Router(cache, store, members, config)
    copies = Copies(cache, store, members, transport, config)
    lifecycle = Lifecycle(cache, store, members, copies, config, describe, registrar(dp.repository))
    return Fleet(dp, store, members, router, lifecycle, transport)


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
