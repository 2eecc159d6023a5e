"""Request metrics, request ids and access logs for both fronts.

Names follow Triton's and KServe's figures with a ``meshserve_`` prefix (README
"Production" maps them). The request path pays a few microseconds: label children
are resolved once per (model, protocol) and kept, times come from
``time.perf_counter_ns`` and nothing is built per request but the log record.
Model labels only ever hold registered model names; anything else is counted under
``model=""``, so random names in URLs cannot grow the label set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from itertools import count
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; from 100 us (small tabular models) to a minute (LLM generations).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REQUEST_ID_HEADER = "x-request-id"
_MAX_ID = 128

access_log = logging.getLogger("meshserve.access")

# The process's request metrics, set when a data plane builds its registry; loaded
# models pick their phase timers from it.
CURRENT: RequestMetrics | None = None


class FrontStats:
    """The pre-resolved children for one (model, protocol)."""

    __slots__ = ("model", "protocol", "_in_flight", "_duration", "_by_status", "_counter")

    def __init__(self, m: RequestMetrics, model: str, protocol: str) -> None:
        self.model = model
        self.protocol = protocol
        self._in_flight = m.in_flight.labels(model, protocol)
        self._duration = m.duration.labels(model, protocol)
        self._counter = m.requests
        self._by_status: dict[Any, Any] = {}

    def begin(self) -> None:
        self._in_flight.inc()

    def end(self, status: int | str, elapsed_ns: int) -> None:
        self._in_flight.dec()
        self._duration.observe(elapsed_ns / 1e9)
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._counter.labels(self.model, self.protocol, str(status))
        child.inc()


class PhaseTimers:
    """Queue / preprocess / predict / postprocess histograms of one model (seconds)."""

    __slots__ = ("queue", "preprocess", "predict", "postprocess", "batch")

    def __init__(self, m: RequestMetrics, model: str) -> None:
        self.queue = m.queue.labels(model).observe
        self.preprocess = m.preprocess.labels(model).observe
        self.predict = m.predict.labels(model).observe
        self.postprocess = m.postprocess.labels(model).observe
        self.batch = m.batch_size.labels(model).observe


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry, known: Callable[[str], bool]) -> None:
        self._known = known
        self.requests = Counter(
            "meshserve_inference_requests", "Inference requests by model, protocol and status (HTTP or gRPC code).",
            ["model", "protocol", "status"], registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "meshserve_inference_request_duration_seconds", "Inference request time, first byte in to last byte out.",
            ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "meshserve_inference_requests_in_flight", "Inference requests being served now.",
            ["model", "protocol"], registry=registry,
        )  # fmt: skip
        phase = "Time {} (seconds), per model."
        self.queue = Histogram(
            "meshserve_inference_queue_duration_seconds", phase.format("waiting for an execution slot or a batch"),
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.preprocess = Histogram(
            "meshserve_inference_preprocess_duration_seconds", phase.format("in the model's preprocess"),
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.predict = Histogram(
            "meshserve_inference_predict_duration_seconds", phase.format("in the model's predict"),
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.postprocess = Histogram(
            "meshserve_inference_postprocess_duration_seconds", phase.format("in the model's postprocess"),
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "meshserve_inference_batch_size", "Rows per model execution of a dynamically batched model.",
            ["model"], buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self._fronts: dict[tuple[str, str], FrontStats] = {}
        self._phases: dict[str, PhaseTimers] = {}

    def front(self, model: str, protocol: str) -> FrontStats:
        stats = self._fronts.get((model, protocol))
        if stats is None:
            label = model if self._known(model) else ""
            stats = self._fronts.get((label, protocol))
            if stats is None:
                stats = self._fronts[(label, protocol)] = FrontStats(self, label, protocol)
            if label:
                self._fronts[(model, protocol)] = stats
        return stats

    def phases(self, model: str) -> PhaseTimers:
        timers = self._phases.get(model)
        if timers is None:
            timers = self._phases[model] = PhaseTimers(self, model)
        return timers


# -- request ids ---------------------------------------------------------------
_PREFIX = os.urandom(6).hex()
_SEQ = count(1)


def new_request_id() -> str:
    """Unique without a syscall per request: a random per-process prefix and a counter."""
    return f"{_PREFIX}-{next(_SEQ):x}"


def clean_request_id(value: bytes | str | None) -> str:
    """The client's id if it is a sane one (printable ASCII, short), else a new one."""
    if value:
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return new_request_id()
        if len(value) <= _MAX_ID and value.isprintable() and value.isascii():
            return value
    return new_request_id()


def log_access(request_id: str, protocol: str, method: str, model: str, status: int | str, elapsed_ns: int) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "%s %s %s %s %.3fms",
            protocol, method, model or "-", status, elapsed_ns / 1e6,
            extra={
                "request_id": request_id, "protocol": protocol, "method": method, "model": model,
                "status": status, "latency_ms": round(elapsed_ns / 1e6, 3),
            },
        )  # fmt: skip


# -- log formats -----------------------------------------------------------------
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure_logging(level: str, fmt: str, access: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access_log.disabled = not access
