"""Which pods are alive, who holds a model, and the kept-alive channels to them."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from meshserve.modelmesh.store import PodRecord
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__package__)  # "meshserve.server.fleet", as before the split


class Pods:
    """Part of :class:`meshserve.server.fleet.Fleet` (its state is set in ``Fleet.__init__``)."""

    # -- who is alive ------------------------------------------------------------
    def _alive(self, pod_id: str) -> bool:
        if pod_id not in self.view.pods:
            return False
        until = self._suspect.get(pod_id)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._suspect[pod_id]
            return True
        return False

    def _mark_suspect(self, pod_id: str) -> None:
        if pod_id not in self._suspect:
            log.warning("pod %s does not answer; skipped until its lease lapses", pod_id)
        self._suspect[pod_id] = time.monotonic() + self._suspect_for
        channel = self._channels.pop(pod_id, None)
        if channel is not None:  # calls still on it end on their own (closing now would cancel them)
            asyncio.ensure_future(channel[0].close(grace=self.settings.forward_timeout_seconds))

    def _other_holders(self, key: str) -> list[str]:
        return [p for p in self.view.holders_of(key) if p != self.id and self._alive(p)]

    def ready_elsewhere(self, key: str) -> bool:
        return bool(self._other_holders(key))

    def _live_holders(self, key: str, include_self: bool = False) -> list[str]:
        return [
            p for p in self.view.holders_of(key) if (p == self.id and include_self) or (p != self.id and self._alive(p))
        ]

    def _stub(self, pod: PodRecord) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
        got = self._channels.get(pod.id)
        if got is None or got[0].get_state() is grpc.ChannelConnectivity.SHUTDOWN:
            limit = self.settings.max_request_bytes
            channel = grpc.aio.insecure_channel(
                pod.grpc,
                options=[
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                    ("grpc.keepalive_time_ms", 30000),
                    ("grpc.enable_retries", 0),
                ],
            )
            got = self._channels[pod.id] = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return got
