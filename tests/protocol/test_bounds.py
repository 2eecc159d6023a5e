"""Issue #13 at the codecs: shapes, nesting, values and BYTES counts are checked before anything
is sized by them, the same way over REST (JSON and binary) and gRPC (typed and raw)."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from meshserve.protocol import rest_codec
from meshserve.protocol.datatypes import MAX_RANK, check_shape, decode_bytes_elements
from meshserve.protocol.errors import InvalidInput, PayloadTooLarge
from meshserve.protocol.grpc import codec as grpc_codec
from meshserve.protocol.grpc import grpc_service_pb2 as pb

T = pb.ModelInferRequest.InferInputTensor


def _json(*inputs: dict, **kw):
    return rest_codec.decode_infer_request(orjson.dumps({"inputs": list(inputs)}), "m", **kw)


def _binary(specs: list[dict], blobs: list[bytes], **kw):
    for spec, blob in zip(specs, blobs, strict=True):
        spec.setdefault("parameters", {})["binary_data_size"] = len(blob)
    header = orjson.dumps({"inputs": specs})
    return rest_codec.decode_infer_request(header + b"".join(blobs), "m", None, len(header), **kw)


def _raw(shape, datatype: str, blob: bytes, **kw):
    msg = pb.ModelInferRequest(model_name="m", inputs=[T(name="x", datatype=datatype, shape=shape)],
                               raw_input_contents=[blob])  # fmt: skip
    return grpc_codec.decode_infer_request(msg, **kw)


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@pytest.mark.parametrize(
    "shape, message",
    [
        ([1] * (MAX_RANK + 1), "at most 32"),
        ([2**64 - 1, 0], "too large"),
        ([2**60, 0], "too large"),
        ([2**30, 2**30, 0], "too large"),
        ([2**62, -1], "too large"),
        ([-2, 1], "negative"),
        ([-1, -1], "more than one -1"),
        ([1.0], "non-integer"),
        ([True], "non-integer"),
        ("1,2", "list of integers"),
    ],
)
def test_shapes_refused_before_allocation(shape, message):
    with pytest.raises(InvalidInput, match=message):
        check_shape("x", shape)


def test_largest_accepted_shapes():
    assert check_shape("x", [1] * MAX_RANK) == [1] * MAX_RANK
    assert _json({"name": "x", "datatype": "FP64", "shape": [2**59, 0], "data": []}).inputs[0].data.shape == (2**59, 0)
    assert _raw([2**59, 0], "INT64", b"").inputs[0].data.shape == (2**59, 0)
    with pytest.raises(InvalidInput, match="too large"):
        _raw([2**63 - 1, 0], "FP32", b"")


def test_nested_json_must_match_the_shape():
    spec = {"name": "x", "datatype": "FP32", "shape": [2, 4]}
    flat = list(range(8))
    assert _json({**spec, "data": flat}).inputs[0].data.shape == (2, 4)
    assert _json({**spec, "data": [flat[:4], flat[4:]]}).inputs[0].data.shape == (2, 4)
    for data in ([flat[i : i + 2] for i in range(0, 8, 2)], [[flat[:4], flat[4:]]], [flat[:4], flat[4:7]]):
        with pytest.raises(InvalidInput, match="nested|regular"):
            _json({**spec, "data": data})
    minus = _json({"name": "x", "datatype": "INT32", "shape": [-1, 2], "data": [[1, 2], [3, 4], [5, 6]]})
    assert minus.inputs[0].data.shape == (3, 2)


def test_nested_bytes_must_match_the_shape_and_stay_shallow():
    spec = {"name": "s", "datatype": "BYTES", "shape": [2, 2]}
    assert _json({**spec, "data": [["a", "b"], ["c", "d"]]}).inputs[0].data[1, 0] == b"c"
    assert _json({**spec, "data": ["a", "b", "c", "d"]}).inputs[0].data.shape == (2, 2)
    for data, message in [
        ([["a", "b", "c", "d"]], "does not match"),
        ([["a", "b", "c"], ["d"]], "regular"),
        ([[["a"], ["b"]], [["c"], ["d"]]], "deeper"),
        (["a", ["b"], "c", "d"], "strings"),
        ([1, 2, 3, 4], "strings"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            _json({**spec, "data": data})
    deep: list = ["a"]
    for _ in range(5000):  # past orjson's own limit, built directly: no recursion anywhere
        deep = [deep]
    with pytest.raises(InvalidInput, match="deeper"):
        rest_codec._bytes_from_json("s", [1], deep, 10)


def test_bytes_elements_are_capped_per_request():
    three = _prefixed(b"a", b"b", b"c")
    assert _binary([{"name": "x", "datatype": "BYTES", "shape": [3]}], [three], max_bytes_elements=3)
    for shape in ([3], [-1]):
        with pytest.raises(PayloadTooLarge, match="max_bytes_elements"):
            _binary([{"name": "x", "datatype": "BYTES", "shape": shape}], [three], max_bytes_elements=2)
        with pytest.raises(PayloadTooLarge, match="max_bytes_elements"):
            _raw(shape, "BYTES", three, max_bytes_elements=2)
    two = {"datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
    assert _json({"name": "x", **two}, {"name": "y", **two}, max_bytes_elements=4)
    with pytest.raises(PayloadTooLarge):  # the cap is the request's, not each input's
        _json({"name": "x", **two}, {"name": "y", **two}, max_bytes_elements=3)
    typed = pb.InferTensorContents(bytes_contents=[b"a", b"b", b"c"])
    msg = pb.ModelInferRequest(model_name="m", inputs=[T(name="x", datatype="BYTES", shape=[3], contents=typed)])
    with pytest.raises(PayloadTooLarge):
        grpc_codec.decode_infer_request(msg, max_bytes_elements=2)
    assert PayloadTooLarge.http_status == 413 and PayloadTooLarge.grpc_code == "RESOURCE_EXHAUSTED"


def test_bytes_decoding_stops_at_the_declared_count():
    """A shape of 2 over a buffer of a million elements reads three of them, not the million."""
    with pytest.raises(InvalidInput, match="expected 2 BYTES elements, found 3"):
        decode_bytes_elements("x", _prefixed(b"") * 1_000_000, count=2)


@pytest.mark.parametrize(
    "datatype, value",
    [("FP16", 1e10), ("FP16", 65520), ("FP16", -70000), ("FP32", 1e39), ("FP32", -3.5e38), ("FP32", 1e300)],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in dot")  # 1e300 squared: refused all the same
def test_json_floats_past_the_range_are_refused(datatype, value):
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}"):
        _json({"name": "x", "datatype": datatype, "shape": [2], "data": [1.0, value]})


def test_json_floats_at_the_range_are_kept():
    fp16 = _json({"name": "x", "datatype": "FP16", "shape": [3], "data": [65504, -65504.0, 65519]}).inputs[0].data
    assert fp16.tolist() == [65504, -65504, 65504]
    big = float(np.finfo(np.float32).max)
    fp32 = _json({"name": "x", "datatype": "FP32", "shape": [3], "data": [big, -big, 1e38]}).inputs[0].data
    assert np.isfinite(fp32).all()


def test_typed_grpc_fp32_carries_inf_and_nan_as_sent():
    contents = pb.InferTensorContents(fp32_contents=[float("inf"), float("nan"), 1.0])
    msg = pb.ModelInferRequest(model_name="m", inputs=[T(name="x", datatype="FP32", shape=[3], contents=contents)])
    out = grpc_codec.decode_infer_request(msg).inputs[0].data
    assert np.isinf(out[0]) and np.isnan(out[1])


@pytest.mark.parametrize("byte", [b"\x02", b"\x80", b"\xff"])
def test_bool_bytes_must_be_0_or_1(byte):
    with pytest.raises(InvalidInput, match="BOOL bytes must be 0 or 1"):
        _binary([{"name": "x", "datatype": "BOOL", "shape": [2]}], [b"\x01" + byte])
    with pytest.raises(InvalidInput, match="BOOL bytes must be 0 or 1"):
        _raw([2], "BOOL", b"\x00" + byte)
    assert _raw([2], "BOOL", b"\x00\x01").inputs[0].data.tolist() == [False, True]
