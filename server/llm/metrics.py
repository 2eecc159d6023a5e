"""Prometheus metrics for LLM engines, named after vLLM's (``vllm:x`` -> ``meshserve_llm_x``).

Counters and gauges are the engines' own integers (``engine.stats()``) read at scrape
time; histograms are observed once per request (time to first token, end-to-end
latency, prompt and generation lengths) or once per decoding step (inter-token
latency: every running sequence got one token in that step). Nothing is recorded
per token beyond the engines' integer adds.

The composition root (server/compose.py) builds one :class:`LLMMetrics` on the server's
registry, reading the engines of the models loaded now (``engines``), and hands each
model that loads to :meth:`LLMMetrics.attach`, which gives its engine an :class:`Observer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

COUNTERS = (  # stats key, metric name (``_total`` added), help
    ("prompt_tokens", "meshserve_llm_prompt_tokens", "Prefilled prompt tokens."),
    ("generation_tokens", "meshserve_llm_generation_tokens", "Generated tokens."),
    ("requests_finished", "meshserve_llm_request_success", "Sequences that finished (stop or length)."),
    ("requests_aborted", "meshserve_llm_request_aborted", "Sequences dropped before finishing (client gone)."),
    ("requests_rejected", "meshserve_llm_request_rejected", "Requests refused because the queue was full."),
)
GAUGES = (
    ("running", "meshserve_llm_num_requests_running", "Sequences in the running batch."),
    ("waiting", "meshserve_llm_num_requests_waiting", "Sequences queued for the batch."),
)

Engines = Callable[[], Iterable[tuple[str, Any]]]  # (model label, engine) of the models loaded now


class _Histograms:
    def __init__(self, registry: CollectorRegistry) -> None:
        def h(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=registry)

        self.ttft = h("meshserve_llm_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = h(
            "meshserve_llm_inter_token_latency_seconds", "Time between tokens of a sequence (per step).", ITL_BUCKETS
        )
        self.e2e = h("meshserve_llm_e2e_request_latency_seconds", "Request latency to the last token.", E2E_BUCKETS)
        self.prompt = h("meshserve_llm_request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS)
        self.generation = h("meshserve_llm_request_generation_tokens", "Tokens generated per request.", TOKEN_BUCKETS)


class Observer:
    """An engine's hooks (called on its worker thread or loop); bound to one model label."""

    __slots__ = ("ttft", "itl", "e2e", "prompt", "generation")

    def __init__(self, model: str, hist: _Histograms) -> None:
        self.ttft = hist.ttft.labels(model)
        self.itl = hist.itl.labels(model)
        self.e2e = hist.e2e.labels(model)
        self.prompt = hist.prompt.labels(model)
        self.generation = hist.generation.labels(model)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_step(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.e2e.observe(seconds)
        self.prompt.observe(prompt_tokens)
        self.generation.observe(completion_tokens)


class LLMCollector(Collector):
    def __init__(self, engines: Engines) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        engines = list(self._engines())
        counters = [(key, CounterMetricFamily(name, doc, labels=["model"])) for key, name, doc in COUNTERS]
        gauges = [(key, GaugeMetricFamily(name, doc, labels=["model"])) for key, name, doc in GAUGES]
        for model, engine in engines:
            stats = engine.stats()
            for key, family in (*counters, *gauges):
                family.add_metric([model], float(stats.get(key, 0)))
        for _, family in (*counters, *gauges):
            yield family


class LLMMetrics:
    """The LLM engines' metrics in one server's registry."""

    def __init__(self, registry: CollectorRegistry, engines: Engines) -> None:
        registry.register(LLMCollector(engines))
        self._histograms = _Histograms(registry)

    def attach(self, model: str, engine: Any) -> None:
        """Observe ``engine``'s requests and steps under the label ``model``."""
        engine.observer = Observer(model, self._histograms)


def loaded_engines(entries: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """The LLM engines of the loaded models among cache ``entries``, one per model name."""
    seen: set[str] = set()
    for entry in entries:
        engine = getattr(entry.handle.model, "engine", None) if entry.handle is not None else None
        if engine is not None and entry.spec.name not in seen:
            seen.add(entry.spec.name)
            yield entry.spec.name, engine
