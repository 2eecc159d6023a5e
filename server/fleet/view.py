"""The fleet view: the model index across pods, metrics and the pod summary."""

from __future__ import annotations

from typing import Any

from meshserve.modelmesh import ModelState


class View:
    """Part of :class:`meshserve.server.fleet.Fleet` (its state is set in ``Fleet.__init__``)."""

    # -- the fleet view ----------------------------------------------------------------
    def index_rows(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows = []
        pods = self.view.pods
        for entry in self.cache.entries():
            spec = entry.spec
            copies = []
            for pod_id in sorted(self.view.holders_of(entry.key)):
                pod = pods.get(pod_id)
                if pod is None:
                    continue
                state = "READY" if self._alive(pod_id) else "UNREACHABLE"
                if pod_id == self.id:
                    state = entry.state.value
                copy = {"pod": pod_id, "http": pod.http, "grpc": pod.grpc, "state": state}
                if pod_id == self.id:
                    copy["extra"] = entry.extra  # evicted before single copies
                copies.append(copy)
            here = entry.state
            if any(c["state"] == "READY" for c in copies) or here is ModelState.READY:
                state = "READY"
            elif here is ModelState.LOADING or entry.key in self.view.claims:
                state = "LOADING"
            else:
                state = here.value
            if ready_only and state != "READY":
                continue
            failures = {p: f.get("reason", "") for p, f in self.view.failures.get(entry.key, {}).items()}
            rows.append(
                {
                    "name": spec.name,
                    "version": spec.version or "",
                    "state": state,
                    "reason": entry.reason if state == here.value else "",
                    "size_bytes": entry.size_bytes,
                    "last_used": entry.last_used_wall() or self.view.last_used.get(entry.key),
                    "pinned": entry.pinned,
                    "requests": entry.requests,
                    "copies": copies,
                    "failures": failures,
                }
            )
        return rows

    def metrics(self) -> list[Any]:
        """Prometheus families for the fleet (read at scrape time)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        routed = CounterMetricFamily(
            "meshserve_fleet_requests", "Requests by how the fleet served them (local, forwarded, miss, retried).",
            labels=["route"],
        )  # fmt: skip
        for route, n in self.counts.items():
            routed.add_metric([route], n)
        live = sum(1 for p in list(self.view.pods) if self._alive(p))
        return [
            routed,
            GaugeMetricFamily("meshserve_fleet_pods", "Live pods in this pod's view of the fleet.", value=live),
            GaugeMetricFamily(
                "meshserve_fleet_store_connected",
                "1 while the coordination store answers.",
                value=int(self.store.connected),
            ),
        ]

    def pods_summary(self) -> list[dict[str, Any]]:
        return [
            {**p.__dict__, "alive": self._alive(p.id), "self": p.id == self.id}
            for p in sorted(self.view.pods.values(), key=lambda p: p.id)
        ]
