"""Issue #13 over real sockets: every request's work is bounded before it is done, and a bad
shape, nesting, value or BYTES count is a 4xx / INVALID_ARGUMENT, never a 500 / INTERNAL."""

from __future__ import annotations

import shutil
import struct

import grpc
import httpx
import numpy as np
import orjson
import pytest
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

from tests.protocol.process_memory import vm_rss
from tests.support.server import EXAMPLES, start_server

T = pb.ModelInferRequest.InferInputTensor
MiB = 1024 * 1024
DEFAULT_MAX_BYTES_ELEMENTS = 1 << 20


def _post(http, doc: dict, binary: bytes | None = None):
    body = orjson.dumps(doc)
    headers = {"content-type": "application/json"}
    if binary is not None:
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(body))}
        body += binary
    return http.post("/v2/models/echo/infer", content=body, headers=headers)


def _grpc_code(stub, msg: pb.ModelInferRequest) -> grpc.StatusCode:
    try:
        stub.ModelInfer(msg, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _input(shape, datatype="FP32", data=()):
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": list(data)}]}


SHAPES = [[2**64 - 1, 0], [2**63 - 1, 0], [2**40, 2**40, 0], [1] * 70, [0] * 33, [2**62, -1]]


@pytest.mark.parametrize("shape", SHAPES, ids=["2**64-1,0", "2**63-1,0", "2**40,2**40,0", "70 dims", "33 zeros", "-1"])
def test_huge_or_deep_shapes_are_400(http, shape):
    r = _post(http, _input(shape, data=[0.5] if shape == [1] * 70 else []))
    assert r.status_code == 400, r.text
    assert "shape" in r.json()["error"]


@pytest.mark.parametrize("shape", [[2**63 - 1, 0], [2**40, 2**40, 0], [1] * 70, [0] * 33])
def test_huge_or_deep_shapes_are_invalid_argument(stub, shape):
    msg = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="FP32", shape=shape)],
                               raw_input_contents=[b"\0" * 4 if shape == [1] * 70 else b""])  # fmt: skip
    assert _grpc_code(stub, msg) == grpc.StatusCode.INVALID_ARGUMENT


def test_deeply_nested_bytes_data_is_400(http):
    data = "[" * 990 + '"a"' + "]" * 990  # by hand: orjson does not write past 255 levels
    body = '{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ' + data + "}]}"
    r = http.post("/v2/models/echo/infer", content=body)
    assert r.status_code == 400 and "nest" in r.json()["error"], r.text


def test_nested_data_must_match_the_shape(http):
    values = np.arange(8, dtype=np.float32)
    assert _post(http, _input([2, 4], data=values.tolist())).status_code == 200  # flat: OIP's form
    assert _post(http, _input([2, 4], data=values.reshape(2, 4).tolist())).status_code == 200
    r = _post(http, _input([2, 4], data=values.reshape(4, 2).tolist()))
    assert r.status_code == 400 and "[4, 2]" in r.json()["error"]
    r = _post(http, _input([2, 2], "BYTES", [["a", "b", "c"], ["d"]]))
    assert r.status_code == 400


def _bytes_elements(n: int, item: bytes = b"") -> bytes:
    return (struct.pack("<I", len(item)) + item) * n


def test_too_many_bytes_elements_rest(http):
    n = DEFAULT_MAX_BYTES_ELEMENTS + 1
    raw = _bytes_elements(n)
    doc = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1], "parameters": {"binary_data_size": len(raw)}}]}
    r = _post(http, doc, raw)
    assert r.status_code == 413 and "BYTES elements" in r.json()["error"]
    r = _post(http, _input([n], "BYTES", [""] * n))
    assert r.status_code == 413 and "BYTES elements" in r.json()["error"]


def test_too_many_bytes_elements_grpc(stub):
    n = DEFAULT_MAX_BYTES_ELEMENTS + 1
    raw = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="BYTES", shape=[n])],
                               raw_input_contents=[_bytes_elements(n)])  # fmt: skip
    assert _grpc_code(stub, raw) == grpc.StatusCode.RESOURCE_EXHAUSTED
    contents = pb.InferTensorContents(bytes_contents=[b""] * n)
    tensor = T(name="x", datatype="BYTES", shape=[n], contents=contents)
    typed = pb.ModelInferRequest(model_name="echo", inputs=[tensor])
    assert _grpc_code(stub, typed) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_many_tiny_bytes_elements_stay_within_memory(echo_server, http):
    """The finding: 22 MiB of 4M two-byte elements took the server from 152 to 1,230 MiB."""
    n = 4 * DEFAULT_MAX_BYTES_ELEMENTS
    raw = _bytes_elements(n, b"ab")
    doc = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": len(raw)}}]}
    before = vm_rss(echo_server.proc.pid)
    for _ in range(3):
        assert _post(http, doc, raw).status_code == 413
    growth = vm_rss(echo_server.proc.pid) - before
    assert growth < 4 * len(raw) + 64 * MiB, f"RSS grew {growth / MiB:.0f} MiB for a {len(raw) / MiB:.0f} MiB body"


def test_fp16_and_fp32_overflow_is_400(http):
    assert _post(http, _input([2], "FP16", [65504, -65504])).json()["outputs"][0]["data"] == [65504, -65504]
    for datatype, value in [("FP16", 1e10), ("FP16", 70000), ("FP32", 1e39)]:
        r = _post(http, _input([1], datatype, [value]))
        assert r.status_code == 400 and "out of range" in r.json()["error"], (datatype, value, r.text)


@pytest.mark.parametrize("byte", [b"\x02", b"\xff"])
def test_bool_bytes_other_than_0_and_1_are_refused(http, stub, byte):
    raw = b"\x01\x00" + byte
    doc = {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}}]}
    r = _post(http, doc, raw)
    assert r.status_code == 400 and "BOOL" in r.json()["error"]
    msg = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="BOOL", shape=[3])],
                               raw_input_contents=[raw])  # fmt: skip
    assert _grpc_code(stub, msg) == grpc.StatusCode.INVALID_ARGUMENT
    ok = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="BOOL", shape=[3])],
                              raw_input_contents=[b"\x01\x00\x01"])  # fmt: skip
    assert stub.ModelInfer(ok).raw_output_contents[0] == b"\x01\x00\x01"


def test_max_bytes_elements_flag_reaches_both_fronts(tmp_path):
    shutil.copytree(EXAMPLES / "echo", tmp_path / "models" / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--max-bytes-elements", "3")
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as http:
            assert _post(http, _input([3], "BYTES", ["a", "b", "c"])).status_code == 200
            two = {"datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
            r = _post(http, {"inputs": [{"name": "x", **two}, {"name": "y", **two}]})  # 4 in all
            assert r.status_code == 413 and "max_bytes_elements" in r.json()["error"]
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            msg = pb.ModelInferRequest(model_name="echo", inputs=[T(name="x", datatype="BYTES", shape=[4])],
                                       raw_input_contents=[_bytes_elements(4)])  # fmt: skip
            assert _grpc_code(stub, msg) == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream = list(stub.ModelStreamInfer(iter([msg]), timeout=30))
            assert "max_bytes_elements" in stream[0].error_message
    finally:
        srv.stop()
