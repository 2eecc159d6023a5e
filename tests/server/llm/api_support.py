"""Shared by the endpoint tests: a model folder with the tiny Llama (and a non-LLM
model beside it), and reading the engine's gauges through /metrics."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support.server import EXAMPLES, RunningServer, start_server


def llm_models(base: Path, tiny_llama: Path, parameters: dict[str, Any] | None = None, settings: bool = True) -> Path:
    """``base/models`` holding ``tiny-llama`` and ``echo``. With ``settings``, the Llama has a
    model-settings.json (runtime llm, ``parameters``); without, its files alone say it is an LLM."""
    models = base / "models"
    models.mkdir(parents=True)
    target = models / "tiny-llama"
    shutil.copytree(tiny_llama, target)
    if settings:
        doc = {"name": "tiny-llama", "runtime": "llm", "parameters": parameters or {}}
        (target / "model-settings.json").write_text(json.dumps(doc))
    shutil.copytree(EXAMPLES / "echo", models / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    return models


@contextlib.contextmanager
def llm_server(base: Path, tiny_llama: Path, *args: str, parameters: dict[str, Any] | None = None,
               settings: bool = True) -> Iterator[RunningServer]:  # fmt: skip
    """A real server over ``llm_models(...)``, stopped on exit."""
    srv = start_server(llm_models(base, tiny_llama, parameters, settings), base / "server.log", *args)
    try:
        yield srv
    finally:
        srv.stop()


def sse_events(lines: Any) -> list[Any]:
    """The JSON payloads of an SSE body (``data: ...`` lines); ``[DONE]`` stays a string."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def engine_gauge(http: httpx.Client, name: str, model: str = "tiny-llama") -> float:
    """An LLM engine gauge (running, waiting) of one model, read from /metrics."""
    text = http.get("/metrics").text
    pattern = re.compile(rf'^meshserve_llm_\w*{name}\w*\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', re.M)
    m = pattern.search(text)
    if m is None:
        raise AssertionError(f"no meshserve_llm_*{name}* gauge for {model} in /metrics")
    return float(m.group(1))


def wait_for_gauge(
    http: httpx.Client, name: str, value: float, timeout: float = 10, model: str = "tiny-llama"
) -> float:
    deadline = time.monotonic() + timeout
    seen = engine_gauge(http, name, model)
    while seen != value and time.monotonic() < deadline:
        time.sleep(0.02)
        seen = engine_gauge(http, name, model)
    return seen


def stream_first_event(port: int, body: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """Open generate_stream on a raw socket (so a test can drop it mid-stream) and read
    until the first event arrived; the socket and the bytes read so far."""
    s = socket.create_connection(("127.0.0.1", port))
    payload = orjson.dumps(body)
    s.sendall(
        b"POST /v2/models/tiny-llama/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    s.settimeout(30)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    return s, got
