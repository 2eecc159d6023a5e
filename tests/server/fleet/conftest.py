"""A real etcd and real meshserve pods joined through it, on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.etcd import RunningEtcd, start_etcd
from tests.support.server import RunningServer, start_server

MODEL_PY = """import asyncio
import os

import numpy as np
from meshserve import Model


class Weighted(Model):
    def load(self):
        if self.name in os.environ.get("FLEET_FAIL_LOAD", "").split(","):
            raise RuntimeError("this pod cannot load " + self.name)
        self.w = np.fromfile(self.path / "weights.bin", dtype=np.float32)

    def size_bytes(self):
        return self.w.nbytes

    async def predict(self, request):
        if self.name == "slow":  # many requests in flight at once
            await asyncio.sleep(0.2)
        x = request.inputs[0].data
        return {"y": x * self.w[0]}
"""
MODELS = [f"m{i}" for i in range(12)] + ["flaky", "slow"]
LEASE = "2"


def make_fleet_models(root: Path) -> Path:
    """Small python models; each multiplies by its own number (m3 by 3.0)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(MODELS):
        d = root / name
        d.mkdir()
        (d / "model.py").write_text(MODEL_PY)
        np.full(1024, float(i), dtype=np.float32).tofile(d / "weights.bin")
        (d / "model-settings.json").write_text(json.dumps({"implementation": "model.py:Weighted"}))
    return root


@pytest.fixture(scope="session")
def fleet_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fleet_models(tmp_path_factory.mktemp("fleet") / "models")


def start_pods(
    etcd: RunningEtcd, models: Path, logs: Path, n: int = 3, prefix: str = "fleet", env: dict | None = None, **per_pod
) -> list[RunningServer]:
    """``n`` pods started at once, each named pod-<i>; ``per_pod[i]`` adds env for pod i."""
    logs.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> RunningServer:
        pod_env = {
            "MESHSERVE_POD_ID": f"pod-{i}",
            "MESHSERVE_FLEET_LEASE_SECONDS": LEASE,
            "MESHSERVE_SHUTDOWN_GRACE_SECONDS": "5",
            **(env or {}),
            **per_pod.get(f"pod{i}", {}),
        }
        args = ("--store", etcd.store_url(prefix), "--no-preload", "--log-level", "info")
        return start_server(models, logs / f"pod-{i}.log", *args, env=pod_env)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:  # no pod left running behind a failed start
        for pod in started:
            pod.stop()
        raise failed[0]
    return started


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEtcd]:
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pods(etcd, fleet_models, tmp_path_factory) -> Iterator[list[RunningServer]]:
    fail = {"FLEET_FAIL_LOAD": "flaky"}  # pod-0 and pod-1 cannot load "flaky"
    running = start_pods(etcd, fleet_models, tmp_path_factory.mktemp("podlogs"), pod0=fail, pod1=fail)
    wait_pods(running[0], 3)
    yield running
    for p in running:
        p.stop()


def infer(pod: RunningServer, model: str, value: float = 2.0, request_id: str | None = None) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]}
    if request_id:
        body["id"] = request_id
    return httpx.post(f"{pod.http_url}/v2/models/{model}/infer", json=body, timeout=30)


def index(pod: RunningServer) -> dict[str, dict]:
    r = httpx.post(f"{pod.http_url}/v2/repository/index", json={}, timeout=10)
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()}


def holders(pod: RunningServer, model: str) -> list[str]:
    return [c["pod"] for c in index(pod)[model]["copies"]]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_pods(pod: RunningServer, n: int) -> None:
    def seen() -> bool:
        r = httpx.get(f"{pod.http_url}/v2/fleet/pods", timeout=5)
        return r.status_code == 200 and sum(1 for p in r.json() if p["alive"]) == n

    wait_for(seen, 15, f"{n} pods in the fleet")


def etcd_call(etcd: RunningEtcd, fn):
    """Run ``fn(client)`` (a coroutine function) against the test etcd."""
    import aetcd

    async def go():
        client = aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=3)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


def pod_index(pods: list[RunningServer], pod_id: str) -> RunningServer:
    return pods[int(pod_id.rsplit("-", 1)[1])]


__all__ = ["os"]
