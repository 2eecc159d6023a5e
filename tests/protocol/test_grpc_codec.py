import numpy as np
import pytest
from meshserve.protocol.datatypes import DTYPES
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc.codec import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
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
