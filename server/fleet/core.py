"""The Fleet: one pod's part of the mesh; its features live in the mixins it combines."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

import grpc
from meshserve.modelmesh.store import CoordinationStore, PodRecord
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.server.fleet.copies import Copies
from meshserve.server.fleet.lifecycle import Lifecycle
from meshserve.server.fleet.pods import Pods
from meshserve.server.fleet.routing import Routing
from meshserve.server.fleet.view import View
from meshserve.server.fleet.wire import MARKER, _advertised_host, _auth_metadata, store_lease

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane
    from meshserve.server.settings import Settings


class Fleet(Lifecycle, Copies, Routing, View, Pods):
    def __init__(self, dp: DataPlane, settings: Settings, store: CoordinationStore) -> None:
        self.dp = dp
        self.settings = settings
        self.store = store
        self.view = store.view
        self.cache = dp.cache
        host = _advertised_host(settings)
        self.id = settings.pod_id or f"{socket.gethostname()}-{settings.grpc_port}"
        self.pod = PodRecord(
            id=self.id,
            http=f"{host}:{settings.http_port}",
            grpc=f"{host}:{settings.grpc_port}",
            capacity=self.cache.capacity_bytes or 0,
        )
        self.leaving = False  # SIGTERM: no new loads here
        self.left = False  # models handed off: requests go to other pods
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}
        self._suspect: dict[str, float] = {}  # pod id -> monotonic time until which it is skipped
        self._pending: dict[str, bool] = {}  # holder records to write: model -> held
        self._gone_used: dict[str, float] = {}  # last use of copies that went, for the store
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_requests: dict[str, int] = {}
        self._copy_tried: dict[str, float] = {}
        self._tick_at = time.monotonic()
        self._published: tuple = ()
        self.counts = {"local": 0, "forwarded": 0, "miss": 0, "retried": 0}
        self._suspect_for = max(2.0 * store_lease(store, settings), 3.0)
        auth = _auth_metadata(settings)
        self._metadata = {k: ((MARKER, k), *auth) for k in ("copy", "forwarded", "miss")}
