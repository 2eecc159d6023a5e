"""Proto <-> protocol types. Raw contents become ``np.frombuffer`` views."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from meshserve.protocol.datatypes import (
    DTYPES,
    MAX_BYTES_ELEMENTS,
    bytes_array,
    bytes_from_buffer,
    cast_checked,
    check_shape,
    decode_bytes_elements,
    dtype_of,
    encode_bytes_elements,
    fixed_from_buffer,
    resolve_shape,
    too_many_bytes_elements,
)
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor, Uint64

# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_INT64_MAX = 2**63 - 1


def decode_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is None:
            continue
        value = getattr(p, which)
        out[key] = Uint64(value) if which == "uint64_param" else value
    return out


def encode_parameters(target: Any, params: Mapping[str, Any]) -> None:
    """Fill a proto parameters map; bools before ints, since bool is an int."""
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, Uint64) or (isinstance(value, int) and value > _INT64_MAX):
            p.uint64_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, (bytes, bytearray)):
            p.string_param = bytes(value).decode(errors="replace")
        else:
            p.string_param = str(value)


def decode_infer_request(msg: pb.ModelInferRequest, max_bytes_elements: int = MAX_BYTES_ELEMENTS) -> InferenceRequest:
    """``max_bytes_elements`` caps the BYTES elements of all inputs together."""
    # len() rather than truth tests and slices rather than list(): on upb messages these are
    # the cheap forms (a map's truth test alone costs more than the rest of a small decode).
    raw = msg.raw_input_contents
    wire_inputs = msg.inputs
    count = len(wire_inputs)
    if not count:
        raise InvalidInput("request must have at least one input")
    if len(raw) and len(raw) != count:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {count} inputs")
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for i in range(count):
        inp = wire_inputs[i]
        name = inp.name
        if not name:
            raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string")
        if name in seen:
            raise InvalidInput(f"input {name!r} appears more than once")
        seen.add(name)
        datatype = inp.datatype
        dtype = dtype_of(datatype)
        shape = check_shape(name, inp.shape[:])
        if len(raw):
            if inp.HasField("contents"):
                raise InvalidInput(f"input {name!r} has typed contents and raw_input_contents is also set")
            if datatype == "BYTES":
                array = bytes_from_buffer(name, shape, raw[i], max_bytes_elements)
            else:
                array = fixed_from_buffer(name, datatype, dtype, shape, raw[i])
        else:
            array = _from_contents(name, datatype, shape, inp.contents, max_bytes_elements)
        if datatype == "BYTES":
            max_bytes_elements -= array.size
        params = inp.parameters
        inputs.append(Tensor(name, datatype, array, decode_parameters(params) if len(params) else {}))
    outputs = None
    if len(msg.outputs):
        outputs = [RequestedOutput(o.name, decode_parameters(o.parameters)) for o in msg.outputs]
    params = msg.parameters
    return InferenceRequest(
        msg.model_name,
        inputs,
        model_version=msg.model_version or None,
        id=msg.id or None,
        outputs=outputs,
        parameters=decode_parameters(params) if len(params) else {},
    )


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents, limit: int
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} can only be sent as raw_input_contents")
    values = getattr(contents, field)
    if datatype == "BYTES":
        if len(values) > limit:
            raise too_many_bytes_elements(name, limit)
        resolved = resolve_shape(name, shape, len(values))
        return bytes_array(list(values), resolved)
    arr = np.array(values, dtype=np.bool_ if datatype == "BOOL" else None)
    if not len(values):
        arr = np.empty(0, dtype=DTYPES[datatype])
    resolved = resolve_shape(name, shape, arr.size)
    return cast_checked(name, arr, datatype).reshape(resolved)


def raw_bytes(data: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw contents. An array that is a whole received buffer (an echo, a
    pass-through) goes back as that very bytes object instead of a copy."""
    if datatype == "BYTES":
        return encode_bytes_elements(data)
    base = data.base
    while isinstance(base, np.ndarray):
        base = base.base
    if (
        isinstance(base, bytes)
        and data.flags.c_contiguous
        and data.dtype == DTYPES[datatype]
        and data.nbytes == len(base)
    ):
        return base
    return np.ascontiguousarray(data, dtype=DTYPES[datatype]).tobytes()


def encode_infer_response(response: InferenceResponse, raw: bool = True) -> pb.ModelInferResponse:
    """Encode a response; ``raw`` selects raw_output_contents (forced when an
    output is FP16, which has no typed field)."""
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version or "")
    if response.id:
        msg.id = response.id
    if response.parameters:
        encode_parameters(msg.parameters, response.parameters)
    if not raw and any(t.datatype not in CONTENTS_FIELD for t in response.outputs):
        raw = True
    raw_parts = []
    for t in response.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.data.shape)
        if t.parameters:
            encode_parameters(out.parameters, t.parameters)
        if raw:
            raw_parts.append(raw_bytes(t.data, t.datatype))
        elif t.datatype == "BYTES":
            out.contents.bytes_contents.extend(
                b if isinstance(b, bytes) else str(b).encode() for b in t.data.reshape(-1)
            )
        else:
            getattr(out.contents, CONTENTS_FIELD[t.datatype]).extend(t.data.reshape(-1).tolist())
    if raw:
        msg.raw_output_contents.extend(raw_parts)
    return msg


def decode_infer_response(msg: pb.ModelInferResponse) -> InferenceResponse:
    """A response message back as protocol types (a pod's forwarded answer, a client's reply):
    raw contents stay in their received buffers, BYTES elements are not limited (the
    sender is a trusted peer that already bounded them)."""
    raw = msg.raw_output_contents
    outputs = []
    for i, out in enumerate(msg.outputs):
        shape = tuple(out.shape)
        if raw:
            buf = raw[i]
            if out.datatype == "BYTES":
                data = bytes_array(decode_bytes_elements(out.name, buf), shape)
            else:
                data = np.frombuffer(buf, dtype=DTYPES[out.datatype]).reshape(shape)
        else:
            values = getattr(out.contents, CONTENTS_FIELD[out.datatype])
            if out.datatype == "BYTES":
                data = bytes_array(list(values), shape)
            else:
                data = np.array(values, dtype=DTYPES[out.datatype]).reshape(shape)
        params = decode_parameters(out.parameters) if out.parameters else {}
        outputs.append(Tensor(out.name, out.datatype, data, params))
    return InferenceResponse(
        msg.model_name,
        outputs,
        model_version=msg.model_version or None,
        id=msg.id or None,
        parameters=decode_parameters(msg.parameters) if msg.parameters else None,
    )


def encode_infer_request(request: InferenceRequest, raw: bool = True) -> pb.ModelInferRequest:
    """Encode a request (used to forward requests and by tests)."""
    msg = pb.ModelInferRequest(model_name=request.model_name, model_version=request.model_version or "")
    if request.id:
        msg.id = request.id
    if request.parameters:
        encode_parameters(msg.parameters, request.parameters)
    for t in request.inputs:
        inp = msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.data.shape)
        if t.parameters:
            encode_parameters(inp.parameters, t.parameters)
        if raw:
            msg.raw_input_contents.append(raw_bytes(t.data, t.datatype))
        elif t.datatype == "BYTES":
            inp.contents.bytes_contents.extend(t.data.reshape(-1).tolist())
        else:
            getattr(inp.contents, CONTENTS_FIELD[t.datatype]).extend(t.data.reshape(-1).tolist())
    for o in request.outputs or ():
        out = msg.outputs.add(name=o.name)
        if o.parameters:
            encode_parameters(out.parameters, o.parameters)
    return msg
