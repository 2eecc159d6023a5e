"""The fleet view: the model index across pods and the fleet's metrics."""

from __future__ import annotations

from typing import Any

from meshserve.modelmesh import ModelCache, ModelState
from meshserve.modelmesh.fleet import Membership, Router
from meshserve.modelmesh.store import CoordinationStore


def index_rows(cache: ModelCache, members: Membership, ready_only: bool = False) -> list[dict[str, Any]]:
    """Every model of the fleet, where its copies are (the repository index in a fleet)."""
    rows = []
    fleet = members.view
    pods = fleet.pods
    for entry in cache.entries():
        spec = entry.spec
        copies = []
        for pod_id in sorted(fleet.holders_of(entry.key)):
            pod = pods.get(pod_id)
            if pod is None:
                continue
            state = "READY" if members.alive(pod_id) else "UNREACHABLE"
            if pod_id == members.id:
                state = entry.state.value
            copy = {"pod": pod_id, "http": pod.http, "grpc": pod.grpc, "state": state}
            if pod_id == members.id:
                copy["extra"] = entry.extra  # evicted before single copies
            copies.append(copy)
        here = entry.state
        if any(c["state"] == "READY" for c in copies) or here is ModelState.READY:
            state = "READY"
        elif here is ModelState.LOADING or entry.key in fleet.claims:
            state = "LOADING"
        else:
            state = here.value
        if ready_only and state != "READY":
            continue
        failures = {p: f.get("reason", "") for p, f in fleet.failures.get(entry.key, {}).items()}
        rows.append(
            {
                "name": spec.name,
                "version": spec.version or "",
                "state": state,
                "reason": entry.reason if state == here.value else "",
                "size_bytes": entry.size_bytes,
                "last_used": entry.last_used_wall() or fleet.last_used.get(entry.key),
                "pinned": entry.pinned,
                "requests": entry.requests,
                "copies": copies,
                "failures": failures,
            }
        )
    return rows


def metrics(router: Router, members: Membership, store: CoordinationStore) -> list[Any]:
    """Prometheus families for the fleet (read at scrape time)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    routed = CounterMetricFamily(
        "meshserve_fleet_requests", "Requests by how the fleet served them (local, forwarded, miss, retried).",
        labels=["route"],
    )  # fmt: skip
    for route, n in router.counts.items():
        routed.add_metric([route], n)
    live = sum(1 for p in list(members.view.pods) if members.alive(p))
    return [
        routed,
        GaugeMetricFamily("meshserve_fleet_pods", "Live pods in this pod's view of the fleet.", value=live),
        GaugeMetricFamily(
            "meshserve_fleet_store_connected", "1 while the coordination store answers.", value=int(store.connected)
        ),
    ]
