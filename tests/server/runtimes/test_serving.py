"""The new runtimes end to end over real sockets: a model folder in each format,
inferred and declared; broken folders fail with their cause while the rest serve."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.protocol.grpc.codec import encode_infer_request
from meshserve.protocol.types import InferenceRequest, Tensor
from meshserve.server.settings import Settings

from tests.server.runtimes import tiny_models as tm
from tests.support.server import EXAMPLES, start_server

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
X = np.random.default_rng(5).random((3, 4), dtype=np.float32)
BROKEN = {
    "bad_format": "model.pt is not a TorchScript program",
    "missing_file": "model file 'nope.onnx' not found in missing_file",
    "bad_class": "cannot import module 'no_such_module'",
    "not_batchable": "does not accept a batch dimension",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, torch_dirs):
    base = tmp_path_factory.mktemp("served")
    shutil.copytree(torch_dirs["export"], base / "mlp_export")  # no settings: runtime from the .pt2
    tm.write_settings(base / "mlp_export", max_batch_size=8, max_batch_latency=2)
    shutil.copytree(torch_dirs["onnx"], base / "mlp_onnx")
    shutil.copytree(torch_dirs["script"], base / "mlp_script")
    tm.write_settings(base / "mlp_script", inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}])
    tm.save_xgboost(base / "gbm")
    tm.write_settings(base / "bad_format", runtime="torch").joinpath("model.pt").write_bytes(b"\x00" * 64)
    shutil.copytree(torch_dirs["onnx"], base / "missing_file")
    tm.write_settings(base / "missing_file", parameters={"file": "nope.onnx"})
    shutil.copytree(torch_dirs["state_dict"], base / "bad_class")
    tm.write_settings(base / "bad_class", parameters={"model_class": "no_such_module:Net"})
    shutil.copytree(EXAMPLES / "echo", base / "not_batchable")
    tm.write_settings(base / "not_batchable", runtime="python", implementation="model.py:EchoModel", max_batch_size=4)
    srv = start_server(base, base.parent / "server.log", env={"MESHSERVE_STRICT_READINESS": "false"}, timeout=120)
    with httpx.Client(base_url=srv.http_url, timeout=30) as http:
        deadline = time.monotonic() + 60
        while any(m["state"] == "LOADING" for m in http.post("/v2/repository/index").json()):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        yield srv, http
    srv.stop()


def expected(x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return tm.tiny_mlp()(torch.from_numpy(x)).numpy()


def rest_infer(http: httpx.Client, model: str, name: str, x: np.ndarray, datatype: str = "FP32") -> httpx.Response:
    doc = {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    return http.post(f"/v2/models/{model}/infer", json=doc)


@pytest.mark.parametrize(
    "model, output", [("mlp_export", "output0"), ("mlp_onnx", "logits"), ("mlp_script", "output0")]
)
def test_rest_infer(served, model, output):
    _, http = served
    r = rest_infer(http, model, "x", X)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == output and out["datatype"] == "FP32" and out["shape"] == [3, 3]
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 3), expected(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["mlp_export", "mlp_onnx"])
def test_grpc_infer_and_metadata(served, model):
    srv, http = served
    meta = http.get(f"/v2/models/{model}").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["platform"] in ("pytorch_export", "onnxruntime_onnx")
    with grpc.insecure_channel(srv.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(encode_infer_request(InferenceRequest(model, [Tensor.from_numpy("x", X)])))
        out = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))
        np.testing.assert_allclose(out, expected(X), rtol=1e-5, atol=1e-5)
        bad = InferenceRequest(model, [Tensor.from_numpy("x", X.astype(np.float64))])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(encode_infer_request(bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"model {model!r}: input 'x' must be FP32, got FP64" in info.value.details()


@pytest.mark.parametrize("model", ["mlp_export", "mlp_onnx", "mlp_script"])
def test_wrong_dtype_and_shape_are_400(served, model):
    _, http = served
    r = rest_infer(http, model, "x", np.ones((2, 4), np.int32), "INT32")
    assert r.status_code == 400 and f"model {model!r}: input 'x' must be FP32, got INT32" in r.json()["error"]
    r = rest_infer(http, model, "x", np.ones((2, 5), np.float32))
    assert r.status_code == 400 and "must have shape [-1, 4], got [2, 5]" in r.json()["error"]


def test_broken_folders_fail_with_their_cause_and_the_rest_serve(served):
    srv, http = served
    index = {m["name"]: m for m in http.post("/v2/repository/index").json()}
    for name, cause in BROKEN.items():
        assert index[name]["state"] == "FAILED", index[name]
        assert cause in index[name]["reason"], index[name]
        r = rest_infer(http, name, "x", X)
        assert r.status_code in (500, 503) and cause in r.json()["error"]  # 500 when it retried the load
    for name in ("mlp_export", "mlp_onnx", "mlp_script", "gbm"):
        assert index[name]["state"] == "READY" and index[name]["size_bytes"] > 0
    overhead = Settings.model_fields["model_overhead_bytes"].default
    assert index["mlp_export"]["size_bytes"] == 134 * 4 + overhead  # parameters, exactly, plus the fixed overhead
    r = rest_infer(http, "gbm", "input0", X)
    assert r.status_code == 200 and r.json()["outputs"][0]["datatype"] == "INT64"


def test_batched_model_answers_concurrent_clients(served):
    _, http = served
    xs = [np.full((1, 4), i / 10, np.float32) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        rs = list(pool.map(lambda x: rest_infer(http, "mlp_export", "x", x), xs))
    for x, r in zip(xs, rs, strict=True):
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected(x)[0], rtol=1e-5, atol=1e-5)
