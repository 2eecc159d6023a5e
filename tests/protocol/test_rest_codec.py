import numpy as np
import orjson
import pytest
from meshserve.protocol.datatypes import DTYPES, encode_bytes_elements
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.rest_codec import decode_infer_request, encode_infer_response
from meshserve.protocol.types import InferenceResponse, RequestedOutput, Tensor

NUMERIC = [d for d in DTYPES if d not in ("BYTES", "BOOL")]


def _decode(doc, binary: bytes | None = None):
    body = orjson.dumps(doc)
    if binary is None:
        return decode_infer_request(body, "m")
    return decode_infer_request(body + binary, "m", header_length=len(body))


@pytest.mark.parametrize("datatype", NUMERIC)
def test_json_numeric_flat_and_nested(datatype):
    flat = _decode({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": [1, 2, 3, 4]}]})
    nested = _decode({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": [[1, 2], [3, 4]]}]})
    for req in (flat, nested):
        arr = req.inputs[0].data
        assert arr.dtype == DTYPES[datatype]
        assert arr.shape == (2, 2)
        assert arr.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("datatype", NUMERIC + ["BOOL"])
def test_binary_input_is_a_view_of_the_body(datatype):
    arr = (np.arange(6) % 2).astype(DTYPES[datatype]).reshape(2, 3)
    req = _decode(
        {
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": [2, 3], "parameters": {"binary_data_size": arr.nbytes}}
            ]
        },
        arr.tobytes(),
    )
    out = req.inputs[0].data
    assert np.array_equal(out, arr) and out.dtype == arr.dtype
    assert not out.flags.owndata  # no copy of the body
    assert "binary_data_size" not in req.inputs[0].parameters


def test_bytes_json_and_binary():
    items = [b"hello", b"", "ünï".encode()]
    req = _decode({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3], "data": ["hello", "", "ünï"]}]})
    assert req.inputs[0].data.tolist() == items
    raw = encode_bytes_elements(np.array(items, dtype=object))
    req = _decode(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [-1], "parameters": {"binary_data_size": len(raw)}}]},
        raw,
    )
    assert req.inputs[0].data.tolist() == items


SEED_BODY = (
    b'{"id": "42","inputs": [{"name": "input0","shape": [-1],"datatype": "BYTES","data": ["Where is Eiffel Tower?"]}]}'
)


def test_seed_request_resolves_minus_one():
    body = SEED_BODY
    req = decode_infer_request(body, "llama2")
    assert req.id == "42"
    assert req.inputs[0].data.shape == (1,)
    assert req.inputs[0].data[0] == b"Where is Eiffel Tower?"


def test_minus_one_resolved_in_any_position():
    req = _decode({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2], "data": [1, 2, 3, 4, 5, 6]}]})
    assert req.inputs[0].data.shape == (3, 2)


def test_zero_size_and_rank_zero():
    req = _decode(
        {
            "inputs": [
                {"name": "empty", "datatype": "FP32", "shape": [0, 3], "data": []},
                {"name": "scalar", "datatype": "INT64", "shape": [], "data": [7]},
            ]
        }
    )
    assert req.inputs[0].data.shape == (0, 3) and req.inputs[0].data.dtype == np.float32
    assert req.inputs[1].data.shape == () and req.inputs[1].data.item() == 7


BAD = [
    ({"inputs": [{"name": "x", "datatype": "fp32", "shape": [1], "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2], "data": [1]}]}, "negative"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.5], "data": [1]}]}, "non-integer"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": ["1"], "data": [1]}]}, "non-integer"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1], "data": [1]}]}, "more than one -1"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 0], "data": []}]}, "cannot resolve"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2], "data": [1, 2, 3]}]}, "cannot resolve"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, "needs 3 elements"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]}, "regular"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, "must be numbers"),
    ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}, "must be integers"),
    ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}, "out of range"),
    ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}]}, "out of range"),
    ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, "true/false"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}, "must be strings"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "no 'data'"),
    ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, "no 'datatype'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}, "no 'shape'"),
    ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "'name'"),
    ({"inputs": []}, "non-empty 'inputs'"),
    ({}, "non-empty 'inputs'"),
    ({"id": 42, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}, "'id'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"a": [1]}}, "parameter"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{}]}, r"outputs\[0\]"),
    (
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
            ]
        },
        "more than once",
    ),
]


@pytest.mark.parametrize("doc,message", BAD)
def test_bad_requests_are_invalid_input(doc, message):
    with pytest.raises(InvalidInput, match=message):
        _decode(doc)


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b"null", b"\xff\xfe"])
def test_malformed_bodies(body):
    with pytest.raises(InvalidInput):
        decode_infer_request(body, "m")


def test_binary_size_mismatches():
    arr = np.ones(4, np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}
    with pytest.raises(InvalidInput, match="overruns"):
        _decode(doc, arr.tobytes()[:8])
    with pytest.raises(InvalidInput, match="belong to no input"):
        _decode(doc, arr.tobytes() + b"xx")
    doc["inputs"][0]["shape"] = [5]
    with pytest.raises(InvalidInput, match="needs 5 elements"):
        _decode(doc, arr.tobytes())
    doc["inputs"][0]["parameters"]["binary_data_size"] = 15
    with pytest.raises(InvalidInput, match="whole number"):
        _decode(doc, arr.tobytes()[:15])
    with pytest.raises(InvalidInput, match="no Inference-Header-Content-Length"):
        decode_infer_request(orjson.dumps(doc), "m")
    with pytest.raises(InvalidInput, match="does not fit"):
        decode_infer_request(orjson.dumps(doc), "m", header_length=10_000)


def test_truncated_binary_bytes():
    doc = {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}
    with pytest.raises(InvalidInput, match="overruns the buffer"):
        _decode(doc, b"\x09\x00\x00\x00ab")


def test_encode_json_and_binary_outputs():
    req = _decode(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}],
        }
    )
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    b = np.array([b"x", b"yz"], dtype=object)
    resp = InferenceResponse("m", [Tensor("a", "FP32", a), Tensor("b", "BYTES", b)], id="7", model_version="1")
    parts, header_len = encode_infer_response(resp, req)
    body = b"".join(bytes(p) for p in parts)
    header = orjson.loads(body[:header_len])
    assert header["id"] == "7" and header["model_version"] == "1"
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert np.array_equal(np.frombuffer(body[header_len:], np.float32).reshape(2, 2), a)
    assert header["outputs"][1]["data"] == ["x", "yz"]


def test_binary_data_output_default_and_override():
    req = _decode(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
        }
    )
    assert isinstance(req.outputs[0], RequestedOutput)
    resp = InferenceResponse("m", [Tensor.from_numpy("a", np.ones(2)), Tensor.from_numpy("b", np.ones(2))])
    parts, header_len = encode_infer_response(resp, req)
    header = orjson.loads(bytes(parts[0]))
    assert "binary_data_size" in header["outputs"][0]["parameters"] and "data" not in header["outputs"][0]
    assert header["outputs"][1]["data"] == [1.0, 1.0]


def test_non_utf8_bytes_output_needs_binary():
    resp = InferenceResponse("m", [Tensor("b", "BYTES", np.array([b"\xff"], dtype=object))])
    with pytest.raises(InvalidInput, match="binary_data"):
        encode_infer_response(resp)


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_json_round_trip_every_datatype(datatype):
    values = [True, False] if datatype == "BOOL" else (["a", "b"] if datatype == "BYTES" else [0, 1])
    req = _decode({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": values}]})
    parts, header_len = encode_infer_response(InferenceResponse("m", req.inputs), req)
    assert header_len is None
    out = orjson.loads(parts[0])["outputs"][0]
    assert out == {"name": "x", "datatype": datatype, "shape": [2], "data": values}


def test_uint64_json_past_int64_is_exact():
    data = [2**64 - 1, 0, 2**63, 1]
    req = _decode({"inputs": [{"name": "x", "datatype": "UINT64", "shape": [4], "data": data}]})
    assert req.inputs[0].data.dtype == np.uint64 and req.inputs[0].data.tolist() == data
    for bad, message in (("[9223372036854775808, 1.5]", "must be integers"),
                         ("[18446744073709551616, 1]", "UINT64"),  # orjson reads it as a float
                         ("[9223372036854775808, -1]", "out of range")):  # fmt: skip
        body = '{"inputs": [{"name": "x", "datatype": "UINT64", "shape": [2], "data": ' + bad + "}]}"
        with pytest.raises(InvalidInput, match=message):
            decode_infer_request(body.encode(), "m")
