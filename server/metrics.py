"""Prometheus metrics for the model cache and per-model requests.

Counters are plain integers kept by the cache and the models and read at scrape
time, so the request path pays no metrics cost. Names follow ModelMesh's
(cache hits/misses, load time, evictions) with a ``meshserve_`` prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from meshserve.server.dataplane import DataPlane

LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class MeshCollector(Collector):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    def collect(self) -> Iterator[Metric]:
        cache = self.dp.cache
        stats = cache.stats
        yield CounterMetricFamily("meshserve_cache_hits", "Requests whose model was resident.", value=stats.hits)
        yield CounterMetricFamily(
            "meshserve_cache_misses", "Requests whose model had to be loaded first.", value=stats.misses
        )
        yield CounterMetricFamily("meshserve_model_loads", "Completed model loads.", value=stats.loads)
        yield CounterMetricFamily("meshserve_model_load_failures", "Failed model loads.", value=stats.load_failures)
        yield CounterMetricFamily("meshserve_evictions", "Models evicted to make room.", value=stats.evictions)
        yield GaugeMetricFamily("meshserve_cache_bytes_used", "Bytes held by resident models.", value=cache.used_bytes)
        yield GaugeMetricFamily(
            "meshserve_cache_capacity_bytes", "Bytes of models this pod may hold.", value=cache.capacity_bytes or 0
        )
        yield GaugeMetricFamily("meshserve_models_resident", "Models loaded now.", value=cache.resident)
        yield GaugeMetricFamily("meshserve_models_registered", "Models registered.", value=len(cache.entries()))
        requests = CounterMetricFamily("meshserve_model_requests", "Requests per model.", labels=["model", "version"])
        failures = CounterMetricFamily(
            "meshserve_model_request_failures", "Failed requests per model.", labels=["model", "version"]
        )
        for entry in cache.entries():
            if entry.requests:
                labels = [entry.spec.name, entry.spec.version or ""]
                requests.add_metric(labels, entry.requests)
                failures.add_metric(labels, entry.failed_requests)
        yield requests
        yield failures
        fleet = self.dp.fleet
        if fleet is not None:
            yield from fleet.metrics()


def load_time_histogram(registry: CollectorRegistry) -> Histogram:
    """Model load times; the cache observes each load (its ``on_load``)."""
    return Histogram("meshserve_model_load_seconds", "Time to load a model.", buckets=LOAD_BUCKETS, registry=registry)


_SCRAPER: ThreadPoolExecutor | None = None


async def scrape(registry: CollectorRegistry) -> bytes:
    """The registry as Prometheus text, built on a thread of its own: with thousands of
    models a scrape is hundreds of milliseconds of Python (5 histograms per model), which
    on the event loop would stall every request; on a thread the loop keeps serving
    between GIL switches. The collectors read snapshots (lists of entries), so the loop
    changing them meanwhile is safe."""
    global _SCRAPER
    if _SCRAPER is None:  # one thread for the process, made on first scrape
        _SCRAPER = ThreadPoolExecutor(1, thread_name_prefix="scrape")
    from prometheus_client import generate_latest

    return await asyncio.get_running_loop().run_in_executor(_SCRAPER, generate_latest, registry)
