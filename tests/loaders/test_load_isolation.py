"""Loads on their own threads: a stuck load holds no predict thread, and a stopping
server waits neither for a load stuck in a model's code nor for a download that
never ends. Real server processes, a real trickling HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.support.server import start_server

QUICK = """
from meshserve import InferenceRequest, Model, Tensor


class Quick(Model):
    def predict(self, request: InferenceRequest) -> list[Tensor]:  # sync: runs on a predict thread
        return request.inputs
"""
HANG = """
import time

from meshserve import Model


class Hang(Model):
    def load(self) -> None:
        time.sleep(60)  # a load that never comes back in time, and ignores any flag

    def predict(self, request):
        return request.inputs
"""
DOC = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}


def _model(root, name: str, source: str, cls: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.py").write_text(source)
    (root / name / "model-settings.json").write_text(json.dumps({"name": name, "implementation": f"model.py:{cls}"}))


def _live(srv) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{srv.http_url}/v2/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(srv.log())


def _background_loads(srv, names: list[str]) -> list[threading.Thread]:
    def load(name: str) -> None:
        try:
            httpx.post(f"{srv.http_url}/v2/repository/models/{name}/load", timeout=90)
        except httpx.HTTPError:
            pass  # the server stops under it

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    return threads


def _stop_seconds(srv) -> float:
    started = time.monotonic()
    srv.stop(timeout=30)
    return time.monotonic() - started


def test_stuck_loads_neither_block_predict_nor_shutdown(tmp_path):
    models = tmp_path / "models"
    _model(models, "quick", QUICK, "Quick")
    hangs = [f"hang{i}" for i in range(6)]
    for name in hangs:
        _model(models, name, HANG, "Hang")
    env = {"MESHSERVE_PREDICT_THREADS": "2", "MESHSERVE_LOAD_THREADS": "2", "MESHSERVE_SHUTDOWN_GRACE_SECONDS": "1"}
    srv = start_server(models, tmp_path / "log", "--no-preload", env=env, wait_ready=False)
    try:
        _live(srv)
        assert httpx.post(f"{srv.http_url}/v2/models/quick/infer", json=DOC, timeout=30).status_code == 200
        _background_loads(srv, hangs)
        time.sleep(1.0)  # six loads now stuck in load()
        started = time.monotonic()
        for _ in range(5):
            r = httpx.post(f"{srv.http_url}/v2/models/quick/infer", json=DOC, timeout=5)
            assert r.status_code == 200, r.text
        assert time.monotonic() - started < 3, "predict waited behind stuck loads"
    finally:
        took = _stop_seconds(srv)
    assert took < 8, f"shutdown waited {took:.1f}s for loads stuck in a model's code"


class _Trickle(BaseHTTPRequestHandler):
    """Serves a tar that never ends: one byte every 50 ms, and records who asked."""

    asked = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).asked.set()
        self.send_response(200)
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickle():
    _Trickle.asked = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Trickle.asked
    server.shutdown()
    server.server_close()


def test_sigterm_stops_a_server_that_is_fetching_an_endless_archive(tmp_path, trickle):
    base, asked = trickle
    models = tmp_path / "models"
    _model(models, "quick", QUICK, "Quick")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"models": [{"name": "evil", "implementation": "x.py:X", "uri": f"{base}/evil.tar"}]}))
    env = {"MESHSERVE_CACHE_DIR": str(tmp_path / "cache"), "MESHSERVE_SHUTDOWN_GRACE_SECONDS": "1"}
    srv = start_server(models, tmp_path / "log", "--no-preload", "--config", str(config), env=env, wait_ready=False)
    try:
        _live(srv)
        _background_loads(srv, ["evil"])
        assert asked.wait(20), srv.log()
        time.sleep(0.5)
    finally:
        took = _stop_seconds(srv)
    assert took < 5, f"SIGTERM took {took:.1f}s with a download in progress"
    assert srv.proc.returncode is not None
