"""Request metrics, request ids and access logs for both fronts.

Names follow Triton's and KServe's figures with a ``meshserve_`` prefix (docs/operations/production.md
maps them). The request path pays a few microseconds: label children
are resolved once per (model, protocol) and kept, times come from
``time.perf_counter_ns`` and nothing is built per request but the log record.
Model labels only ever hold registered model names; anything else is counted under
``model=""``, so random names in URLs cannot grow the label set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Seconds; from 100 us (small tabular models) to a minute (LLM generations).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REQUEST_ID_HEADER = "x-request-id"
_MAX_ID = 128

access_log = logging.getLogger("meshserve.access")


class _Hist:
    """A histogram kept as plain numbers: observed on the event loop only (both fronts,
    the batcher and the phase timers run there), read at scrape time, so no locks."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((floatToGoString(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class FrontStats:
    """The figures of one (model, protocol), resolved once and kept."""

    __slots__ = ("model", "protocol", "in_flight", "duration", "by_status")

    def __init__(self, model: str, protocol: str) -> None:
        self.model = model
        self.protocol = protocol
        self.in_flight = 0
        self.duration = _Hist(LATENCY_BUCKETS)
        self.by_status: dict[int | str, int] = {}

    def begin(self) -> None:
        self.in_flight += 1

    def end(self, status: int | str, elapsed_ns: int) -> None:
        self.in_flight -= 1
        self.duration.observe(elapsed_ns / 1e9)
        by_status = self.by_status
        by_status[status] = by_status.get(status, 0) + 1


class PhaseTimers:
    """Queue / preprocess / predict / postprocess histograms of one model (seconds), and
    its batch sizes; each attribute is the ``observe`` to call."""

    __slots__ = ("hists", "queue", "preprocess", "predict", "postprocess", "batch", "queue_counts")

    def __init__(self) -> None:
        self.hists = {name: _Hist(LATENCY_BUCKETS) for name in PHASES}
        self.hists["batch"] = _Hist(BATCH_BUCKETS)
        for name, hist in self.hists.items():
            setattr(self, name, hist.observe)
        self.queue_counts = self.hists["queue"].counts  # a request that did not wait: [0] += 1


PHASES = {
    "queue": "waiting for an execution slot or a batch",
    "preprocess": "in the model's preprocess",
    "predict": "in the model's predict",
    "postprocess": "in the model's postprocess",
}


class RequestMetrics(Collector):
    """Per-request figures, registered in the server's registry and read at scrape time."""

    def __init__(self, registry: CollectorRegistry, known: Callable[[str], bool]) -> None:
        self._known = known
        self._kept: dict[str, dict[str, FrontStats]] = {}  # protocol -> model ("" for unknown names) -> figures
        self._all: list[FrontStats] = []
        self._phases: dict[str, PhaseTimers] = {}
        registry.register(self)

    def front(self, model: str, protocol: str) -> FrontStats:
        by_model = self.kept(protocol)
        stats = by_model.get(model)
        if stats is None:
            label = model if self._known(model) else ""
            stats = by_model.get(label)
            if stats is None:
                stats = by_model[label] = FrontStats(label, protocol)
                self._all.append(stats)
        return stats

    def kept(self, protocol: str) -> dict[str, FrontStats]:
        """A protocol's figures by registered model name, as ``front`` finds them: a front
        reads ``kept.get(name) or metrics.front(name, protocol)``, one lookup per request.
        Unknown names are never kept (they share the figures under "")."""
        kept = self._kept.get(protocol)
        if kept is None:
            kept = self._kept[protocol] = {}
        return kept

    def phases(self, model: str) -> PhaseTimers:
        timers = self._phases.get(model)
        if timers is None:
            timers = self._phases[model] = PhaseTimers()
        return timers

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "meshserve_inference_requests", "Inference requests by model, protocol and status (HTTP or gRPC code).",
            labels=["model", "protocol", "status"],
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "meshserve_inference_request_duration_seconds", "Inference request time, first byte in to last byte out.",
            labels=["model", "protocol"],
        )  # fmt: skip
        in_flight = GaugeMetricFamily(
            "meshserve_inference_requests_in_flight", "Inference requests being served now.",
            labels=["model", "protocol"],
        )  # fmt: skip
        for f in list(self._all):
            labels = [f.model, f.protocol]
            for status, n in list(f.by_status.items()):
                requests.add_metric([*labels, str(status)], n)
            duration.add_metric(labels, f.duration.buckets(), f.duration.sum)
            in_flight.add_metric(labels, f.in_flight)
        yield requests
        yield duration
        yield in_flight
        for phase, what in PHASES.items():
            fam = HistogramMetricFamily(
                f"meshserve_inference_{phase}_duration_seconds", f"Time {what} (seconds), per model.", labels=["model"]
            )
            for model, timers in list(self._phases.items()):
                hist = timers.hists[phase]
                fam.add_metric([model], hist.buckets(), hist.sum)
            yield fam
        batch = HistogramMetricFamily(
            "meshserve_inference_batch_size", "Rows per model execution of a dynamically batched model.",
            labels=["model"],
        )  # fmt: skip
        for model, timers in list(self._phases.items()):
            hist = timers.hists["batch"]
            if any(hist.counts):
                batch.add_metric([model], hist.buckets(), hist.sum)
        yield batch


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


class AccessLog:
    """Access lines, formatted here and written in batches (every 50 ms, or at 64 KiB):
    the logging module and a write per request would cost more than the request itself.
    Called on the event loop only. JSON lines carry the same fields as other JSON logs."""

    def __init__(self, fmt: str, stream: Any = None, errors_only: bool = False) -> None:
        self.json = fmt == "json"
        self.errors_only = errors_only
        self.stream = stream or sys.stderr
        self.buffer: list[bytes] = []
        self.size = 0
        self.scheduled = False
        self._sec = -1
        self._stamp = ""

    def _ts(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) if self.json else (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))  # fmt: skip
        ms = int((now - sec) * 1000)
        return f"{self._stamp}.{ms:03d}Z" if self.json else f"{self._stamp},{ms:03d}"

    def write(self, rid: str, protocol: str, method: str, model: str, status: int | str, elapsed_ns: int) -> None:
        if self.errors_only and (status == "OK" or (isinstance(status, int) and status < 400)):
            return
        ms = round(elapsed_ns / 1e6, 3)
        # Names and ids come from clients: no secrets, and one line stays one line.
        model, rid = redact(model), redact(rid)
        if not model.isprintable():
            model = repr(model)
        if self.json:
            line = orjson.dumps(
                {
                    "ts": self._ts(), "level": "info", "logger": "meshserve.access",
                    "msg": f"{protocol} {method} {model or '-'} {status} {ms}ms", "request_id": rid,
                    "protocol": protocol, "method": method, "model": model, "status": status, "latency_ms": ms,
                }
            ) + b"\n"  # fmt: skip
        else:
            text = f"{self._ts()} INFO meshserve.access: {protocol} {method} {model or '-'} {status} {ms}ms id={rid}\n"
            line = text.encode()
        self.buffer.append(line)
        self.size += len(line)
        if self.size >= 65536:
            self.flush()
        elif not self.scheduled:
            try:
                asyncio.get_running_loop().call_later(0.05, self.flush)
                self.scheduled = True
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        self.buffer.clear()
        self.size = 0
        try:
            out = getattr(self.stream, "buffer", None)
            if out is not None:
                self.stream.flush()
                out.write(data)
                out.flush()
            else:
                self.stream.write(data.decode())
                self.stream.flush()
        except (OSError, ValueError):
            pass


ACCESS: AccessLog | None = None


def log_access(request_id: str, protocol: str, method: str, model: str, status: int | str, elapsed_ns: int) -> None:
    access = ACCESS
    # The default keeps errors only: a success is dropped here, before a call per request.
    if access is not None and not (access.errors_only and (status == "OK" or (type(status) is int and status < 400))):
        access.write(request_id, protocol, method, model, status, elapsed_ns)


def flush_access_log() -> None:
    if ACCESS is not None:
        ACCESS.flush()


# -- log formats -----------------------------------------------------------------
# uvicorn's color_message is its message again with ANSI colours: not for a JSON line.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


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
        return redact(orjson.dumps(doc, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def redact(text: str) -> str:
    from meshserve.server.security import redact as _redact

    return _redact(text)


def configure_logging(level: str, fmt: str, access: str = "all") -> None:
    """``access``: which requests get an access line, "all", "errors" or "off"."""
    # Progress bars (Hugging Face downloads and weight loading) are not log lines: off in a server.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    global ACCESS
    if ACCESS is not None:
        ACCESS.flush()
    on = access in ("all", "errors") and access_log.isEnabledFor(logging.INFO)
    ACCESS = AccessLog(fmt, errors_only=access == "errors") if on else None
    if ACCESS is not None:
        import atexit

        atexit.register(ACCESS.flush)
