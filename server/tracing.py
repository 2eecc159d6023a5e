"""OpenTelemetry spans, optional (the ``otel`` extra; ``--tracing``).

One server span per inference request, a child of the caller's ``traceparent`` (REST
header or gRPC metadata), with children ``decode``, ``queue``, ``predict`` and
``encode``. Off (the default), nothing is imported and the request path tests one
module global. Spans go where the standard ``OTEL_*`` variables say (OTLP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp``, ``console``), or as
JSON lines to ``MESHSERVE_TRACE_FILE``; a tracer provider set up by the host
(e.g. ``opentelemetry-instrument``) is used, its sampler wrapped by the noise filter.

Noise: health probes and scrapes (``/v2/health/*``, ``/metrics``, gRPC ``ServerLive``/
``ServerReady``, polled every few seconds by every kubelet and Prometheus) and the ASGI
instrumentation's internal ``http receive``/``http send`` spans would bury the requests
worth reading; they are dropped at sampling unless ``trace_probes`` asks for them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

TRACER: Any = None  # an opentelemetry Tracer when tracing is on
_propagator: Any = None


PROBE_PATHS = ("/metrics", "/v2/health/live", "/v2/health/ready")
PROBE_RPCS = ("ServerLive", "ServerReady", "Check", "Watch")  # OIP health and grpc.health.v1


def is_noise(name: str, attributes: Any) -> bool:
    """A span of a health probe, a scrape or the ASGI framework's per-message internals."""
    attrs = attributes or {}
    if name.endswith((" http receive", " http send")) or "asgi.event.type" in attrs:  # ASGI per-message spans
        return True
    path = attrs.get("url.path") or attrs.get("http.target") or ""
    if isinstance(path, str) and path.split("?", 1)[0].rstrip("/") in PROBE_PATHS:
        return True
    method = attrs.get("rpc.method") or name.rpartition("/")[2]
    return method in PROBE_RPCS and ("Health" in name or "GRPCInferenceService" in name or "rpc.service" in attrs)


def _noise_filter(inner: Any) -> Any:
    """A sampler that drops noise (``is_noise``) and asks ``inner`` about everything else."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class NoiseFilter(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):  # fmt: skip
            if is_noise(name, attributes):
                return SamplingResult(Decision.DROP)
            return inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"MeshserveNoiseFilter{{{inner.get_description()}}}"

    return NoiseFilter()


def setup(enabled: bool, service_name: str = "meshserve", trace_probes: bool = False) -> None:
    global TRACER, _propagator
    if not enabled:
        TRACER = None
        return
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.error("--tracing needs the otel extra (pip install 'meshserve[otel]'); tracing stays off")
        return
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        provider = _sdk_provider(service_name, trace_probes)
        trace.set_tracer_provider(provider)
    elif not trace_probes and hasattr(provider, "sampler"):  # the host's SDK provider
        provider.sampler = _noise_filter(provider.sampler)
    TRACER = provider.get_tracer("meshserve")
    _propagator = TraceContextTextMapPropagator()


def _sdk_provider(service_name: str, trace_probes: bool) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    sampler = _get_from_env_or_default()  # OTEL_TRACES_SAMPLER, as the SDK would
    sampler = sampler if trace_probes else _noise_filter(sampler)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
    path = os.environ.get("MESHSERVE_TRACE_FILE")
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if path:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesExporter(path), schedule_delay_millis=200))
    elif kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind == "otlp" or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class JsonLinesExporter:
    """Spans as JSON lines in a file: trace id, span id, parent, name, times, attributes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Iterable[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx = s.get_span_context()
            lines.append(
                json.dumps(
                    {
                        "name": s.name,
                        "trace_id": f"{ctx.trace_id:032x}",
                        "span_id": f"{ctx.span_id:016x}",
                        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
                        "start": s.start_time,
                        "end": s.end_time,
                        "attributes": dict(s.attributes or {}),
                    }
                )
            )
        with self._lock, open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@contextmanager
def request_span(name: str, traceparent: str | bytes | None, protocol: str, model: str) -> Iterator[Any]:
    """The server span of one request, a child of the caller's trace when it sent one."""
    from opentelemetry.trace import SpanKind

    parent = None
    if traceparent:
        tp = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
        parent = _propagator.extract({"traceparent": tp})
    attributes = {"rpc.system": protocol, "meshserve.model": model}
    with TRACER.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes) as span:
        yield span


def shutdown() -> None:
    if TRACER is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
