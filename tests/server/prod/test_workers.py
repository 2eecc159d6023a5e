"""--workers 2: shared ports, each model in one worker, any connection reaches any model,
metrics summed over workers, one copy of each model in memory."""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
from meshserve.server.workers import owner_of

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc, scrape, write_model
from tests.support.server import start_server

MB = 1 << 20
SIZE = 64 * MB

BIG = f'''
import numpy as np

from meshserve import InferenceRequest, Model


class Big(Model):
    """Holds {SIZE // MB} MiB of its own (touched, so resident)."""

    def load(self):
        self.weights = np.ones({SIZE} // 8, dtype=np.float64)

    def predict(self, request: InferenceRequest):
        return {{"y": np.asarray(request.inputs[0].data) + self.weights[0]}}
'''


def _names() -> tuple[list[str], list[str]]:
    """Three models for worker 0, one for worker 1."""
    zero, one = [], []
    i = 0
    while len(zero) < 3 or len(one) < 1:
        name = f"big{i}"
        (zero if owner_of(name, 2) == 0 else one).append(name)
        i += 1
    return zero[:3], one[:1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_two_workers_share_ports_and_models(tmp_path):
    zero, one = _names()
    for name in zero + one:
        write_model(tmp_path / "models", name, BIG, "Big")
    # No worker copies (tests/server/prod/test_worker_copies.py): 12 quick requests a model can pass
    # their rate, and this test checks one owner per model.
    flags = ("--workers", "2", "--shutdown-grace", "5", "--worker-copy-rate", "0")
    srv = start_server(tmp_path / "models", tmp_path / "server.log", *flags)
    try:
        m = None
        deadline = time.monotonic() + 10
        while m is None and time.monotonic() < deadline:
            m = re.search(r"started 2 workers \((\d+), (\d+)\)", srv.log())
            time.sleep(0.05)
        assert m, srv.log()
        pids = [int(m[1]), int(m[2])]
        # Both workers ready (readiness answers for the worker's own models).
        for _ in range(10):
            assert httpx.get(f"{srv.http_url}/v2/health/ready").status_code == 200
        names = zero + one
        n = 12

        def rest(name: str) -> float:
            with httpx.Client(timeout=10) as c:  # a fresh connection: the kernel picks the worker
                r = c.post(f"{srv.http_url}/v2/models/{name}/infer", json=infer_doc([1]))
                assert r.status_code == 200, r.text
                assert r.headers["x-request-id"]
                return r.json()["outputs"][0]["data"][0]

        def rpc(name: str) -> float:
            with grpc.insecure_channel(srv.grpc_address) as channel:
                stub = grpc_stub(channel)
                out, call = stub.ModelInfer.with_call(
                    grpc_infer_request(name, [1]), metadata=[("x-request-id", f"id-{name}")], timeout=10
                )
                assert dict(call.trailing_metadata())["x-request-id"] == f"id-{name}"
                return out.outputs[0].contents.fp64_contents[0]

        from meshserve.protocol.grpc import grpc_service_pb2 as pb

        for _ in range(4):
            with grpc.insecure_channel(srv.grpc_address) as channel:
                assert grpc_stub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5).ready
                index = grpc_stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
                assert sorted((m.name, m.state) for m in index.models) == sorted((x, "READY") for x in names)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(rest, names * n)) == [2.0] * len(names) * n
            assert list(pool.map(rpc, names * n)) == [2.0] * len(names) * n
        with httpx.Client(base_url=srv.http_url, timeout=10) as http:
            # Metadata, readiness and the repository API reach the owner too.
            for name in names:
                assert http.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
            index = http.post("/v2/repository/index", json={}).json()
            assert sorted((r["name"], r["state"]) for r in index) == sorted((x, "READY") for x in names)
            assert http.post("/v2/models/nope/infer", json=infer_doc([1])).status_code == 404
            # Metrics gathered from both workers, whichever one answers the scrape.
            for _ in range(4):
                text = httpx.get(f"{srv.http_url}/metrics").text
                for name in names:
                    total = "meshserve_inference_requests_total"
                    assert scrape(text, total, model=name, protocol="rest", status="200") == n
                    assert scrape(text, total, model=name, protocol="grpc", status="OK") == n
                assert scrape(text, "meshserve_model_loads_total") == len(names)
                assert scrape(text, "meshserve_models_resident") == len(names)
                # Every worker registers every model: the pod has each once, not once per worker.
                assert scrape(text, "meshserve_models_registered") == len(names)
        # One copy of each model: worker 0 holds 3, worker 1 holds 1.
        rss0, rss1 = (_rss(p) for p in pids)
        print(f"worker RSS: {rss0 / MB:.0f} MiB (3 models of {SIZE // MB} MiB), {rss1 / MB:.0f} MiB (1 model)")
        assert abs((rss0 - rss1) - 2 * SIZE) < 0.5 * SIZE, (rss0 / MB, rss1 / MB)
        assert rss0 + rss1 < 2 * (rss1 - SIZE) + len(names) * SIZE + 100 * MB
        # A worker that dies is started again; its models come back with it.
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with httpx.Client(timeout=5) as c:
                    if c.get(f"{srv.http_url}/v2/health/ready").status_code == 200 and rest(one[0]) == 2.0:
                        break
            except (httpx.TransportError, AssertionError):
                pass
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        assert "worker 1" in srv.log() and "restarting" in srv.log()
        assert srv.stop() == 0
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        srv.stop()


def test_a_port_in_use_fails_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    from tests.support.server import REPO, free_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cmd = [sys.executable, "-m", "meshserve.server.cli", "serve", "--host", "127.0.0.1", "--http-port", str(port),
               "--grpc-port", str(free_port()), "--workers", "2", "--model-dir", str(tmp_path)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1 and "address in use" in out.stderr


def test_one_start_line_per_worker(tmp_path):
    """Each worker runs two uvicorn servers (the shared port and a Unix socket for its peers):
    uvicorn's own start/stop lines would come twice per worker, with "Press CTRL+C to quit"
    for a socket; meshserve says once per process where it listens."""
    import shutil

    from tests.support.server import EXAMPLES

    shutil.copytree(EXAMPLES / "echo", tmp_path / "models" / "echo")
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--workers", "2", "--shutdown-grace", "1")
    deadline = time.monotonic() + 20
    while len(re.findall(r"worker \d/2: REST on", srv.log())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.stop() == 0
    log = srv.log()
    starts = re.findall(r"worker (\d)/2: REST on 127\.0\.0\.1:\d+, gRPC on 127\.0\.0\.1:\d+ \(pid (\d+)\)", log)
    assert sorted(w for w, _ in starts) == ["0", "1"], log
    assert len({pid for _, pid in starts}) == 2
    for noise in ("Press CTRL+C", "Started server process", "Uvicorn running", "Finished server process"):
        assert noise not in log, log
    assert log.count("started 2 workers") == 1
