"""The in-pod mesh over real sockets: lazy loads, eviction and the repository index and metrics that show them."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.support.server import start_server

ECHO = """from meshserve import Model


class Echo(Model):
    async def predict(self, request):
        return request.inputs
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Eight python models of 100 KiB predicted size each, room for three."""
    root = tmp_path_factory.mktemp("mesh")
    models = root / "models"
    for i in range(8):
        d = models / f"m{i}"
        d.mkdir(parents=True)
        (d / "model.py").write_text(ECHO)
        (d / "weights.bin").write_bytes(b"\0" * 100 * 1024)
        settings = {"implementation": "model.py:Echo", "pinned": i == 7}
        (d / "model-settings.json").write_text(json.dumps(settings))
    srv = start_server(
        models, root / "log", "--capacity-bytes", str(330 * 1024), "--min-churn-age", "0",
        env={
            "MESHSERVE_DEFAULT_MODEL_BYTES": "0",
            "MESHSERVE_MODEL_OVERHEAD_BYTES": "0",
            "MESHSERVE_MEASURED_OVERHEAD_BYTES": "0",
        },
    )  # fmt: skip
    with httpx.Client(base_url=srv.http_url, timeout=30) as client:
        yield client
    srv.stop()


def infer(client, model: str, value: float) -> httpx.Response:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]}
    return client.post(f"/v2/models/{model}/infer", json=doc)


def states(client) -> dict[str, str]:
    return {row["name"]: row["state"] for row in client.post("/v2/repository/index").json()}


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_lazy_loading_and_lru_eviction(mesh):
    before = states(mesh)
    assert before["m7"] == "READY"  # pinned: preloaded
    assert sum(s == "READY" for s in before.values()) <= 3
    assert metric(mesh, "meshserve_cache_capacity_bytes") == 330 * 1024
    for i in range(7):  # every model answers, loading on demand, evicting the coldest
        r = infer(mesh, f"m{i}", float(i))
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [float(i)]
        assert metric(mesh, "meshserve_cache_bytes_used") <= 330 * 1024
    after = states(mesh)
    assert after["m7"] == "READY" and after["m6"] == "READY" and after["m5"] == "READY"
    assert after["m0"] == "EVICTED"
    assert metric(mesh, "meshserve_evictions_total") >= 4
    assert metric(mesh, "meshserve_cache_misses_total") >= 4
    index = {row["name"]: row for row in mesh.post("/v2/repository/index").json()}
    assert index["m6"]["size_bytes"] >= 100 * 1024 and index["m6"]["last_used"] is not None
    assert index["m0"]["size_bytes"] == 0


def test_metrics_count_hits_and_requests(mesh):
    hits = metric(mesh, "meshserve_cache_hits_total")
    assert infer(mesh, "m7", 1.0).status_code == 200
    assert metric(mesh, "meshserve_cache_hits_total") == hits + 1
    text = mesh.get("/metrics").text
    assert re.search(r'meshserve_model_requests_total\{model="m7",version=""\} [1-9]', text)
    assert "meshserve_model_load_seconds_bucket" in text


def test_unknown_and_unloaded_models_in_the_mesh(mesh):
    assert infer(mesh, "nope", 1.0).status_code == 404
    assert mesh.post("/v2/repository/models/m1/unload").status_code == 200
    misses = metric(mesh, "meshserve_cache_misses_total")
    r = infer(mesh, "m1", 1.0)
    assert r.status_code == 503 and "unloaded" in r.json()["error"]
    assert metric(mesh, "meshserve_cache_misses_total") == misses  # refused, not a miss
    assert mesh.post("/v2/repository/models/m1/load").status_code == 200
    assert infer(mesh, "m1", 1.0).status_code == 200
