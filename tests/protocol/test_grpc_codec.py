import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.protocol.datatypes import DTYPES
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.grpc import codec
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc.codec import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    serialize_infer_response,
)
from meshserve.protocol.types import InferenceRequest, InferenceResponse, Tensor, Uint64


def _array(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([b"a", b"", b"\xff\x00"], dtype=object)
    if datatype == "BOOL":
        return np.array([True, False, True])
    dtype = DTYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, 0, info.max], dtype=dtype)
    return np.array([-1.5, 0, np.finfo(dtype).max], dtype=dtype)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("datatype", list(DTYPES))
def test_round_trip_every_datatype(datatype, raw):
    if datatype == "FP16" and not raw:
        pytest.raises(
            KeyError, encode_infer_request, InferenceRequest("m", [Tensor.from_numpy("x", _array("FP16"))]), raw
        )
        return
    arr = _array(datatype).reshape(3, 1)
    msg = encode_infer_request(InferenceRequest("m", [Tensor("x", datatype, arr)], id="i"), raw=raw)
    wire = pb.ModelInferRequest.FromString(msg.SerializeToString())
    req = decode_infer_request(wire)
    out = req.inputs[0].data
    assert out.shape == (3, 1) and req.inputs[0].datatype == datatype
    assert out.tolist() == arr.tolist()
    resp = encode_infer_response(InferenceResponse("m", req.inputs, id="i"), raw=raw)
    assert bool(resp.raw_output_contents) == (raw or datatype == "FP16")
    # The way back (a pod's forwarded answer): the same tensors, and the same bytes once re-encoded.
    back = decode_infer_response(pb.ModelInferResponse.FromString(resp.SerializeToString()))
    assert back.id == "i" and back.outputs[0].data.tolist() == arr.tolist() and back.outputs[0].data.shape == (3, 1)
    again = encode_infer_response(back, raw=bool(resp.raw_output_contents))
    assert again.SerializeToString() == resp.SerializeToString()


def test_parameters_every_type_both_ways():
    params = {"i": -3, "u": Uint64(2**64 - 1), "d": 0.25, "b": True, "s": "x"}
    msg = encode_infer_request(InferenceRequest("m", [Tensor.from_numpy("x", np.ones(1))], parameters=params))
    assert msg.parameters["u"].WhichOneof("parameter_choice") == "uint64_param"
    assert msg.parameters["i"].WhichOneof("parameter_choice") == "int64_param"
    assert msg.parameters["b"].WhichOneof("parameter_choice") == "bool_param"
    req = decode_infer_request(msg)
    assert req.parameters == params and isinstance(req.parameters["u"], Uint64)
    resp = encode_infer_response(InferenceResponse("m", [], parameters=req.parameters))
    kinds = {k: v.WhichOneof("parameter_choice") for k, v in resp.parameters.items()}
    assert kinds == {
        "i": "int64_param",
        "u": "uint64_param",
        "d": "double_param",
        "b": "bool_param",
        "s": "string_param",
    }


def _request(**kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", **kw)


def test_errors():
    T = pb.ModelInferRequest.InferInputTensor
    cases = [
        (_request(), "at least one input"),
        (_request(inputs=[T(name="x", datatype="FP32", shape=[1])], raw_input_contents=[b"", b""]), "2 entries"),
        (
            _request(
                inputs=[T(name="x", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1]))],
                raw_input_contents=[b"\0\0\0\0"],
            ),
            "typed contents",
        ),
        (_request(inputs=[T(name="x", datatype="FP32", shape=[2])], raw_input_contents=[b"\0" * 4]), "needs 2"),
        (_request(inputs=[T(name="x", datatype="FP32", shape=[1])], raw_input_contents=[b"\0" * 3]), "whole number"),
        (
            _request(inputs=[T(name="x", datatype="Fp32", shape=[1])], raw_input_contents=[b"\0" * 4]),
            "unknown datatype",
        ),
        (_request(inputs=[T(name="x", datatype="FP32", shape=[-3])], raw_input_contents=[b"\0" * 4]), "negative"),
        (_request(inputs=[T(name="x", datatype="FP16", shape=[1])]), "raw_input_contents"),
        (
            _request(
                inputs=[T(name="x", datatype="INT8", shape=[1], contents=pb.InferTensorContents(int_contents=[999]))]
            ),
            "out of range",
        ),
        (_request(inputs=[T(name="", datatype="FP32", shape=[1])], raw_input_contents=[b"\0" * 4]), "name"),
    ]
    for msg, message in cases:
        with pytest.raises(InvalidInput, match=message):
            decode_infer_request(msg)


def test_raw_input_is_a_view():
    arr = np.arange(8, dtype=np.float32)
    msg = encode_infer_request(InferenceRequest("m", [Tensor.from_numpy("x", arr)]))
    out = decode_infer_request(msg).inputs[0].data
    assert np.array_equal(out, arr) and not out.flags.owndata


# -- a raw layout seen before: decoded with one lookup, checked the same ------------------------
def _raw(datatype: str, shape: list[int], data: bytes, name: str = "x") -> pb.ModelInferRequest:
    T = pb.ModelInferRequest.InferInputTensor
    return _request(inputs=[T(name=name, datatype=datatype, shape=shape)], raw_input_contents=[data])


def test_a_layout_seen_before_still_checks_the_length_and_the_bool_bytes():
    good = decode_infer_request(_raw("FP32", [2, 3], np.arange(6, dtype=np.float32).tobytes()))
    assert ("FP32", 2, 3) in codec._LAYOUTS
    again = decode_infer_request(_raw("FP32", [2, 3], np.ones(6, dtype=np.float32).tobytes()))
    assert again.inputs[0].data.shape == (2, 3) and again.inputs[0].data.sum() == 6 and good.inputs[0].data[1, 2] == 5
    assert not again.inputs[0].data.flags.owndata and not again.inputs[0].data.flags.writeable
    for wrong, message in ((b"\0" * 20, "needs 6"), (b"\0" * 22, "whole number"), (b"", "needs 6")):
        with pytest.raises(InvalidInput, match=message):
            decode_infer_request(_raw("FP32", [2, 3], wrong))
    decode_infer_request(_raw("BOOL", [2], b"\x01\x00"))  # BOOL is never taken from the table
    assert ("BOOL", 2) not in codec._LAYOUTS
    with pytest.raises(InvalidInput, match="0 or 1"):
        decode_infer_request(_raw("BOOL", [2], b"\x01\x02"))
    decode_infer_request(_raw("INT32", [-1, 2], b"\0" * 16))  # resolved from the data: not kept
    assert not any(-1 in key[1:] for key in codec._LAYOUTS)
    with pytest.raises(InvalidInput, match="cannot resolve"):
        decode_infer_request(_raw("INT32", [-1, 2], b"\0" * 12))
    with pytest.raises(InvalidInput, match="unknown datatype"):  # typed contents of an unknown type
        decode_infer_request(
            _request(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="F32", shape=[1])])
        )


def test_the_layout_table_is_bounded():
    for n in range(codec._TABLE_MAX + 50):
        decode_infer_request(_raw("UINT8", [1, n + 1], b"\0" * (n + 1)))
        assert len(codec._LAYOUTS) <= codec._TABLE_MAX
    assert decode_infer_request(_raw("UINT8", [1, 3], b"abc")).inputs[0].data.tobytes() == b"abc"


# -- answers written as wire bytes: the same message as the encoder's ----------------------------
_NAMES = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)  # encodable as UTF-8
_FIXED = [d for d in DTYPES if d not in ("BYTES", "BOOL")]


@st.composite
def _responses(draw) -> InferenceResponse:
    outputs = []
    for name in draw(st.lists(_NAMES, max_size=4, unique=True)):
        datatype = draw(st.sampled_from([*_FIXED, "BOOL", "BYTES"]))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        if draw(st.booleans()) and shape:  # a dimension over 127: a two-byte varint
            shape = (*shape[:-1], 130)
        size = int(np.prod(shape))
        if datatype == "BYTES":
            data = np.array([bytes([i % 256]) * (i % 3) for i in range(size)], dtype=object).reshape(shape)
        else:
            data = np.arange(size).astype(DTYPES[datatype]).reshape(shape)
        params = draw(st.sampled_from([None, {"p": 1}]))
        outputs.append(Tensor(name, datatype, data, params))
    return InferenceResponse(
        draw(_NAMES),
        outputs,
        model_version=draw(st.sampled_from([None, "", "1", "v" * 200])),
        id=draw(st.sampled_from([None, "", "req-1", "é" * 70])),
        parameters=draw(st.sampled_from([None, {}, {"sequence_id": 3}])),
    )


@settings(max_examples=300, deadline=None)
@given(_responses(), st.booleans())
def test_wire_bytes_parse_to_the_encoders_message(response, raw):
    wire = serialize_infer_response(response, raw)
    assert pb.ModelInferResponse.FromString(wire) == encode_infer_response(response, raw)
    assert serialize_infer_response(response, raw) == wire  # the kept parts give the same bytes again


def test_wire_bytes_of_a_large_tensor_and_its_copy():
    big = np.arange(300_000, dtype=np.float32)
    response = InferenceResponse("m", [Tensor("y", "FP32", big.reshape(3, 100_000))], model_version="2", id="r")
    msg = pb.ModelInferResponse.FromString(serialize_infer_response(response))
    assert msg.model_version == "2" and msg.id == "r" and list(msg.outputs[0].shape) == [3, 100_000]
    assert np.array_equal(np.frombuffer(msg.raw_output_contents[0], np.float32), big)
