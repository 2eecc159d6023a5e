"""The REST front over a real socket: the seed request, binary data, every error case."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson
import pytest


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


SEED = (
    '{"id": "42","inputs": [{"name": "input0","shape": [-1],"datatype": "BYTES","data": ["Where is Eiffel Tower?"]}]}'
)


def test_seed_curl_request_verbatim(server):
    out = subprocess.run(
        ["curl", "-s", "-H", "content-type:application/json", f"{server.http_url}/v2/models/echo/infer", "-d", SEED],
        capture_output=True, check=True,
    )  # fmt: skip
    doc = orjson.loads(out.stdout)
    assert doc["id"] == "42" and doc["model_name"] == "echo"
    assert doc["outputs"] == [{"name": "input0", "datatype": "BYTES", "shape": [1], "data": ["Where is Eiffel Tower?"]}]


def test_health_and_metadata(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    meta = http.get("/v2").json()
    assert meta["name"] == "meshserve" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    typed = http.get("/v2/models/typed").json()
    assert typed["versions"] == ["1"]
    assert typed["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 3]}
    assert http.get("/v2/models/typed/versions/1").json() == typed
    assert http.get("/v2/models/typed/versions/1/ready").json() == {"name": "typed", "ready": True}
    assert http.get("/openapi.json").status_code == 200


def test_iris_predicts(http):
    x = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    r = http.post(
        "/v2/models/iris/infer",
        json={
            "inputs": [{"name": "input0", "shape": [2, 4], "datatype": "FP32", "data": x}],
            "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
        },
    )
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["predict"]["data"] == [0, 2] and out["predict"]["datatype"] == "INT64"
    assert out["predict_proba"]["shape"] == [2, 3]


def test_binary_request_and_response(http):
    arr = np.random.default_rng(0).random((1, 150528), dtype=np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 150528], "parameters": {"binary_data_size": arr.nbytes}}
            ],
            "outputs": [{"name": "x", "parameters": {"binary_data": True}}],
        }
    )
    r = http.post(
        "/v2/models/echo/infer",
        content=header + arr.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    doc = orjson.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == arr.nbytes
    assert np.array_equal(np.frombuffer(r.content[n:], np.float32).reshape(1, -1), arr)


def test_hooks_model(http):
    r = http.post(
        "/v2/models/hooks/infer", json={"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    )
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["scaled"]["data"] == [2.5, 5.0] and out["scaled"]["datatype"] == "FP64"
    assert out["total"]["data"] == [7.5]


def _infer(http, model, doc, **kw):
    return http.post(f"/v2/models/{model}/infer", content=doc if isinstance(doc, bytes) else orjson.dumps(doc), **kw)


GOOD = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                   {"name": "INPUT1", "datatype": "FP32", "shape": [1, 3], "data": [1, 1, 1]}]}  # fmt: skip


def _with(**changes):
    doc = orjson.loads(orjson.dumps(GOOD))
    doc["inputs"][0].update(changes)
    return doc


ERRORS = [
    ("typed", b"{not json", 400, "not valid JSON"),
    ("typed", b"", 400, "empty"),
    ("typed", {"inputs": "x"}, 400, "inputs"),
    ("typed", _with(datatype="fp32"), 400, "unknown datatype"),
    ("typed", _with(shape=[1, -3]), 400, "negative"),
    ("typed", _with(shape=[1, 2.5]), 400, "non-integer"),
    ("typed", _with(shape=[2, 3]), 400, "needs 6 elements"),
    ("typed", _with(datatype="INT32"), 400, "must be FP32"),
    ("typed", _with(shape=[3, 1]), 400, "must have shape"),
    ("typed", _with(name="OTHER"), 400, "has no input 'OTHER'"),
    ("typed", {"inputs": GOOD["inputs"][:1]}, 400, "needs input"),
    ("typed", {**GOOD, "outputs": [{"name": "NOPE"}]}, 400, "has no output 'NOPE'"),
    ("echo", {**GOOD, "outputs": [{"name": "NOPE"}]}, 400, "has no output 'NOPE'"),
    ("nope", GOOD, 404, "not found"),
    ("raises", GOOD, 500, "always fails"),
]


@pytest.mark.parametrize("model,doc,status,message", ERRORS)
def test_errors(http, model, doc, status, message):
    r = _infer(http, model, doc)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "Traceback" not in r.text


def test_unknown_version_and_routes(http):
    r = http.post("/v2/models/typed/versions/9/infer", content=orjson.dumps(GOOD))
    assert r.status_code == 404 and "no version '9'" in r.json()["error"]
    assert http.get("/v2/models/nope").status_code == 404
    assert http.get("/v2/models/nope/ready").status_code == 404
    r = http.get("/v2/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_bad_binary_header(http):
    r = _infer(http, "echo", GOOD, headers={"Inference-Header-Content-Length": "abc"})
    assert r.status_code == 400 and "integer" in r.json()["error"]
    r = _infer(http, "echo", GOOD, headers={"Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400


def test_oversized_body_is_refused(tmp_path, model_dir):
    from tests.support.server import start_server

    srv = start_server(model_dir, tmp_path / "log", "--max-request-bytes", "4096")
    try:
        with httpx.Client(base_url=srv.http_url) as c:
            big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2000], "data": [0.5] * 2000}]}
            r = _infer(c, "echo", big)
            assert r.status_code == 413 and "exceeds" in r.json()["error"]
            r = c.post("/v2/repository/index", content=b"x" * 5000)
            assert r.status_code == 413
            small = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
            assert _infer(c, "echo", small).status_code == 200
    finally:
        srv.stop()


def test_models_stay_loaded_after_errors(http):
    for model, doc, _, _ in ERRORS:
        _infer(http, model, doc)
    index = http.post("/v2/repository/index").json()
    assert all(row["state"] == "READY" for row in index), index
    assert http.get("/v2/health/ready").status_code == 200


def test_repository_load_unload(http, model_dir):
    assert http.post("/v2/repository/models/iris/unload").status_code == 200
    assert http.get("/v2/models/iris/ready").status_code == 400
    r = _infer(
        http, "iris", {"inputs": [{"name": "input0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    )
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    assert http.post("/v2/repository/index", json={"ready": True}).json()[0]["state"] == "READY"
    assert "iris" not in [m["name"] for m in http.post("/v2/repository/index", json={"ready": True}).json()]
    assert http.post("/v2/repository/models/iris/load").status_code == 200
    assert http.get("/v2/models/iris/ready").json()["ready"] is True
    assert http.post("/v2/repository/models/nope/load").status_code == 404
    assert http.post("/v2/repository/models/nope/unload").status_code == 404
    assert http.post("/v2/repository/models/iris/load", content=b"{bad").status_code == 400


def test_repository_load_with_config(http, model_dir):
    config = {"implementation": "model.py:EchoModel", "uri": str(model_dir / "echo")}
    r = http.post("/v2/repository/models/echo2/load", json={"parameters": {"config": orjson.dumps(config).decode()}})
    assert r.status_code == 200, r.text
    assert _infer(http, "echo2", GOOD).status_code == 200
    broken = {"implementation": "model.py:Missing", "uri": str(model_dir / "echo")}
    r = http.post("/v2/repository/models/echo2/load", json={"parameters": {"config": broken}})
    assert r.status_code == 500 and "still serves" in r.json()["error"]
    assert _infer(http, "echo2", GOOD).status_code == 200
    r = http.post("/v2/repository/models/echo3/load", json={"parameters": {"config": {"implementation": "x.py:Y"}}})
    assert r.status_code == 400 and "uri" in r.json()["error"]
    r = http.post("/v2/repository/models/echo3/load", json={"parameters": {"config": {"bogus": 1}}})
    assert r.status_code == 400 and "bogus" in r.json()["error"]


def test_200_concurrent_requests_get_their_own_answers(server):
    def one(i: int) -> bool:
        data = [float(i), float(i) * 2, -float(i)]
        doc = {"id": str(i), "inputs": [{"name": "v", "datatype": "FP64", "shape": [3], "data": data}]}
        r = httpx.post(f"{server.http_url}/v2/models/echo/infer", content=orjson.dumps(doc), timeout=30)
        body = r.json()
        return body["id"] == str(i) and body["outputs"][0]["data"] == data

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)


def test_compressed_request_and_response(http):
    import gzip
    import zlib

    arr = np.arange(1000, dtype=np.float32)
    doc = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1000], "data": arr.tolist()}]})
    for encoding, packed in (("gzip", gzip.compress(doc)), ("deflate", zlib.compress(doc))):
        r = http.post(
            "/v2/models/echo/infer",
            content=packed,
            headers={"Content-Encoding": encoding, "Accept-Encoding": encoding},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-encoding"] == encoding
        assert r.json()["outputs"][0]["data"] == arr.tolist()  # httpx decompresses
    r = http.post("/v2/models/echo/infer", content=doc, headers={"Content-Encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]
    r = http.post("/v2/models/echo/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]


def test_failed_api_load_keeps_the_server_ready(http, model_dir):
    config = {"implementation": "model.py:Missing", "uri": str(model_dir / "echo")}
    r = http.post("/v2/repository/models/brand_new/load", json={"parameters": {"config": config}})
    assert r.status_code == 500
    assert http.get("/v2/health/ready").status_code == 200
    index = {row["name"]: row for row in http.post("/v2/repository/index").json()}
    assert index["brand_new"]["state"] == "FAILED" and "Missing" in index["brand_new"]["reason"]
