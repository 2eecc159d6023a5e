"""Who is in the fleet: this pod's record and state, the live pods, who holds a model.

Liveness is the store's view (a pod whose lease lapsed is gone) corrected by experience:
a pod that did not answer is a suspect, skipped until its lease would have lapsed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from meshserve.modelmesh.store import FleetView, PodRecord

log = logging.getLogger(__name__)


class Membership:
    """``forget(pod_id)`` is called when a pod becomes a suspect (the transport drops its channel)."""

    def __init__(
        self, view: FleetView, pod: PodRecord, suspect_seconds: float, forget: Callable[[str], None] = lambda _: None
    ) -> None:
        self.view = view
        self.pod = pod
        self.id = pod.id
        self.suspect_seconds = suspect_seconds
        self._forget = forget
        self._suspect: dict[str, float] = {}  # pod id -> monotonic time until which it is skipped
        self.leaving = False  # shutting down: no new loads here
        self.left = False  # models handed off: requests go to other pods

    def alive(self, pod_id: str) -> bool:
        if pod_id not in self.view.pods:
            return False
        until = self._suspect.get(pod_id)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._suspect[pod_id]
            return True
        return False

    def suspect(self, pod_id: str) -> None:
        if pod_id not in self._suspect:
            log.warning("pod %s does not answer; skipped until its lease lapses", pod_id)
        self._suspect[pod_id] = time.monotonic() + self.suspect_seconds
        self._forget(pod_id)

    def live_pods(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[PodRecord]:
        return [p for p in self.view.pods.values() if p.id not in exclude and self.alive(p.id)]

    def other_holders(self, key: str) -> list[str]:
        """Live pods other than this one with a copy of ``key``."""
        return [p for p in self.view.holders_of(key) if p != self.id and self.alive(p)]

    def holders(self, key: str) -> list[str]:
        """Every live copy of ``key``, this pod's included."""
        return [p for p in self.view.holders_of(key) if p == self.id or self.alive(p)]

    def ready_elsewhere(self, key: str) -> bool:
        return bool(self.other_holders(key))

    def summary(self) -> list[dict]:
        return [
            {**p.__dict__, "alive": self.alive(p.id), "self": p.id == self.id}
            for p in sorted(self.view.pods.values(), key=lambda p: p.id)
        ]
