"""Model directories and helpers for the production tests (real server processes)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

SLOW = '''
import time

import numpy as np

from meshserve import InferenceRequest, Model


class Slow(Model):
    """y = 2x after sleeping ``parameters.sleep`` seconds (from the request)."""

    supports_batching = True

    def predict(self, request: InferenceRequest):
        time.sleep(float((request.parameters or {}).get("sleep", 0)))
        return {"y": np.asarray(request.inputs[0].data) * 2}
'''

HOOKS = """
import numpy as np

from meshserve import InferenceRequest, Model


class Hooks(Model):
    def preprocess(self, request: InferenceRequest):
        return request.inputs[0].data.astype(np.float64)

    def predict(self, x):
        return x + 1

    def postprocess(self, y):
        return {"y": y}
"""


def write_model(root: Path, name: str, source: str, cls: str, **settings) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.py").write_text(source)
    (d / "model-settings.json").write_text(json.dumps({"name": name, "implementation": f"model.py:{cls}", **settings}))
    return d


def make_prod_models(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "slow", SLOW, "Slow", max_concurrency=64)
    write_model(root, "rows", SLOW, "Slow", max_batch_size=16, max_batch_latency=30)
    write_model(root, "hooks", HOOKS, "Hooks")
    return root


@pytest.fixture(scope="module")
def prod_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prod_models(tmp_path_factory.mktemp("prod") / "models")


def infer_doc(x: list[float], sleep: float = 0.0) -> dict:
    doc = {"inputs": [{"name": "x", "shape": [len(x)], "datatype": "FP32", "data": x}]}
    if sleep:
        doc["parameters"] = {"sleep": sleep}
    return doc


def scrape(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def grpc_infer_request(model: str, x: list[float], sleep: float = 0.0):
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="x", datatype="FP32", shape=[len(x)])
    t.contents.fp32_contents.extend(x)
    if sleep:
        req.parameters["sleep"].double_param = sleep
    return req


def grpc_stub(channel):
    from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


def spawn_server(model_dir: Path, log: Path, *args: str, probe, env: dict | None = None, timeout: float = 60):
    """A server started like tests/support/server.py's, ready when ``probe(server)`` is true
    (for servers the plain readiness poll cannot reach: TLS, tokens on health)."""
    import os
    import subprocess
    import time

    from tests.support.server import REPO, RunningServer, free_port, meshserve_command

    http_port, grpc_port = free_port(), free_port()
    cmd = [*meshserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--model-dir", str(model_dir), *args]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO
    )
    srv = RunningServer(proc, http_port, grpc_port, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"meshserve exited with {proc.returncode}:\n{srv.log()}")
        try:
            if probe(srv):
                return srv
        except Exception:
            pass
        if time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError(f"meshserve not ready after {timeout}s:\n{srv.log()}")
        time.sleep(0.1)


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends on a raw socket until it closes (or resets, or times out)."""
    out = b""
    while True:
        try:
            got = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not got:
            break
        out += got
    return out
