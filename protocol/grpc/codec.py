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
    has_raw = len(raw) > 0
    for i in range(count):
        inp = wire_inputs[i]
        name = inp.name
        if not name:
            raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string")
        if count > 1:
            if name in seen:
                raise InvalidInput(f"input {name!r} appears more than once")
            seen.add(name)
        datatype = inp.datatype
        shape = inp.shape[:]
        if has_raw:
            if inp.HasField("contents"):
                raise InvalidInput(f"input {name!r} has typed contents and raw_input_contents is also set")
            buf = raw[i]
            layout = _LAYOUTS.get((datatype, *shape))
            if layout is not None and len(buf) == layout[0]:  # a layout that passed the checks before
                array = _frombuffer(buf, layout[1]).reshape(shape)
            else:
                array = _from_raw(name, datatype, shape, buf, max_bytes_elements)
        else:
            array = _from_contents(name, datatype, shape, inp.contents, max_bytes_elements)
        if datatype == "BYTES":
            max_bytes_elements -= array.size
        params = inp.parameters
        inputs.append(Tensor(name, datatype, array, decode_parameters(params) if len(params) else None))
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


# (datatype, *shape) -> (byte length, dtype) of the raw fixed-size tensors that passed
# ``_from_raw``'s checks: a request of a layout seen before is decoded with one lookup and a
# length compare. BOOL is never kept (its bytes are checked each time), nor a shape with -1;
# the table is bounded and starts over when full.
_LAYOUTS: dict[tuple, tuple[int, np.dtype]] = {}
_frombuffer = np.frombuffer


def _from_raw(name: str, datatype: str, shape: list[int], buf: bytes, limit: int) -> np.ndarray:
    dtype = dtype_of(datatype)
    shape = check_shape(name, shape)
    if datatype == "BYTES":
        return bytes_from_buffer(name, shape, buf, limit)
    array = fixed_from_buffer(name, datatype, dtype, shape, buf)
    if datatype != "BOOL" and -1 not in shape:
        _cached(_LAYOUTS, (datatype, *shape), (array.nbytes, dtype))
    return array


def _from_contents(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents, limit: int
) -> np.ndarray:
    dtype_of(datatype)
    shape = check_shape(name, shape)
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


def serialize_infer_response(response: InferenceResponse, raw: bool = True) -> bytes:
    """``encode_infer_response(response, raw).SerializeToString()``, written directly for the
    usual answer (raw contents, no parameters): a model's name and each output's name, datatype
    and shape are encoded once and kept, and each tensor's bytes are copied once, into the
    message. Anything else goes through the message."""
    if not raw or response.parameters:
        return encode_infer_response(response, raw).SerializeToString()
    version = response.model_version or ""
    head = _HEADS.get((response.model_name, version))
    if head is None:
        head = _cached(_HEADS, (response.model_name, version), _head(response.model_name, version))
    parts = [head]
    if response.id:
        parts.append(_string(0x1A, response.id))
    contents = []
    for t in response.outputs:
        if t.parameters:
            return encode_infer_response(response, raw).SerializeToString()
        data = t.data
        key = (t.name, t.datatype, data.shape)
        out = _OUTPUTS.get(key)
        if out is None:
            out = _cached(_OUTPUTS, key, _output(t.name, t.datatype, data.shape))
        parts.append(out)
        contents.append(raw_bytes(data, t.datatype))
    for b in contents:
        n = len(b)
        parts.append(_RAW_TAGS[n] if n < 128 else b"\x32" + _varint(n))
        parts.append(b)
    return b"".join(parts)


# Encoded message parts, kept: (model, version) -> fields 1-2; (name, datatype, shape) -> one
# ``outputs`` entry. Bounded (as ``_LAYOUTS``); each starts over when full.
_HEADS: dict[tuple[str, str], bytes] = {}
_OUTPUTS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_RAW_TAGS = [b"\x32" + bytes((n,)) for n in range(128)]  # field 6 (raw_output_contents) and a short length


_TABLE_MAX = 1024  # entries in each kept table


def _cached(table: dict, key: Any, value: Any) -> Any:
    """Keep ``value`` under ``key`` in a bounded table (emptied when full); return it."""
    if len(table) >= _TABLE_MAX:
        table.clear()
    table[key] = value
    return value


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string(tag: int, value: str) -> bytes:
    b = value.encode()
    return bytes((tag,)) + _varint(len(b)) + b


def _head(model: str, version: str) -> bytes:
    return _string(0x0A, model) + (_string(0x12, version) if version else b"")


def _output(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One ``InferOutputTensor`` as field 5: name (1), datatype (2), packed shape (3)."""
    body = _string(0x0A, name) + _string(0x12, datatype)
    if shape:
        dims = b"".join(_varint(d) for d in shape)
        body += b"\x1a" + _varint(len(dims)) + dims
    return b"\x2a" + _varint(len(body)) + body


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
