"""The REST JSON codec with Triton's binary tensor data extension.

Binary input tensors become ``np.frombuffer`` views of the request body and
binary outputs are returned as memoryviews of the output arrays, so large
tensors never pass through JSON or Python lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from meshserve.protocol.datatypes import (
    DTYPES,
    MAX_BYTES_ELEMENTS,
    bytes_array,
    bytes_from_buffer,
    cast_checked,
    check_shape,
    dtype_of,
    encode_bytes_elements,
    fixed_from_buffer,
    resolve_shape,
    too_many_bytes_elements,
)
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

HEADER_LENGTH = "inference-header-content-length"
_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY


def loads_object(body: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object, turning every failure into InvalidInput."""
    if not body:
        raise InvalidInput(f"{what} is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return doc


def decode_parameters(value: Any, kind: str = "request", name: str | None = None) -> dict[str, Any]:
    """Check a parameters object; ``kind``/``name`` say whose, for the error message only."""
    if value is None:
        return {}
    if type(value) is dict:
        for v in value.values():
            if not isinstance(v, (str, int, float, bool)):
                break
        else:
            return value
    where = kind if name is None else f"{kind} {name!r}"
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    bad = next(k for k, v in value.items() if not isinstance(v, (str, int, float, bool)))
    raise InvalidInput(f"{where}: parameter {bad!r} must be a string, number or boolean")


def decode_infer_request(
    body: bytes,
    model_name: str,
    model_version: str | None = None,
    header_length: int | None = None,
    max_bytes_elements: int = MAX_BYTES_ELEMENTS,
) -> InferenceRequest:
    """Decode an infer request body; ``header_length`` is the value of the
    Inference-Header-Content-Length header when the binary extension is used;
    ``max_bytes_elements`` caps the BYTES elements of all inputs together."""
    binary: memoryview | None = None
    json_part: bytes | memoryview = body
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes"
            )
        view = memoryview(body)
        json_part, binary = view[:header_length], view[header_length:]
    doc = loads_object(json_part)

    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("'id' must be a string")
    params = doc.get("parameters")
    parameters = {} if params is None else decode_parameters(params)
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise InvalidInput("request must have a non-empty 'inputs' list")

    inputs: list[Tensor] = []
    several = len(specs) > 1
    seen: set[str] = set()
    offset = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{i}]: 'name' must be a non-empty string")
        if several:
            if name in seen:
                raise InvalidInput(f"input {name!r} appears more than once")
            seen.add(name)
        datatype = spec.get("datatype")
        if datatype is None:
            raise InvalidInput(f"input {name!r} has no 'datatype'")
        dtype = dtype_of(datatype)
        if "shape" not in spec:
            raise InvalidInput(f"input {name!r} has no 'shape'")
        shape = check_shape(name, spec["shape"])
        params = spec.get("parameters")
        params = {} if params is None else decode_parameters(params, "input", name)
        size = params.pop("binary_data_size", None) if params else None
        if size is not None:
            if "data" in spec:
                raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
            if binary is None:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has no Inference-Header-Content-Length"
                )
            if type(size) is not int or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary_data_size {size} overruns the binary data")
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                array = bytes_from_buffer(name, shape, chunk, max_bytes_elements)
            else:
                array = fixed_from_buffer(name, datatype, dtype, shape, chunk)
        else:
            if "data" not in spec:
                raise InvalidInput(f"input {name!r} has no 'data'")
            if datatype == "BYTES":
                array = _bytes_from_json(name, shape, spec["data"], max_bytes_elements)
            else:
                array = _from_json(name, datatype, shape, spec["data"])
        if datatype == "BYTES":
            max_bytes_elements -= array.size
        inputs.append(Tensor(name, datatype, array, params))
    if binary is not None and offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")

    outputs = None
    out_specs = doc.get("outputs")
    if out_specs is not None:
        if not isinstance(out_specs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for i, o in enumerate(out_specs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
                raise InvalidInput(f"outputs[{i}] must be an object with a non-empty 'name'")
            outputs.append(RequestedOutput(o["name"], decode_parameters(o.get("parameters"), "output", o["name"])))
    return InferenceRequest(
        model_name, inputs, model_version=model_version, id=req_id, outputs=outputs, parameters=parameters
    )


def _bytes_from_json(name: str, shape: list[int], data: Any, limit: int) -> np.ndarray:
    """BYTES data: strings, flat or nested as the shape, walked level by level (no recursion)."""
    level = data if type(data) is list else [data]
    nested = [len(level)]
    while level and type(level[0]) is list:
        if len(nested) >= len(shape):
            raise InvalidInput(f"input {name!r}: 'data' is nested deeper than the shape's {len(shape)} dimensions")
        n = len(level[0])
        inner: list[Any] = []
        for item in level:
            if type(item) is not list or len(item) != n:
                raise InvalidInput(f"input {name!r}: 'data' is not a regular nested list")
            inner += item
        nested.append(n)
        level = inner
    if len(level) > limit:
        raise too_many_bytes_elements(name, limit)
    try:
        items = [s.encode() for s in level]
    except (AttributeError, UnicodeEncodeError):
        raise InvalidInput(f"input {name!r}: BYTES data must be strings") from None
    resolved = resolve_shape(name, shape, len(items))
    if len(nested) > 1 and nested != resolved:
        raise InvalidInput(f"input {name!r}: 'data' nested as {nested} does not match the shape {resolved}")
    return bytes_array(items, resolved)


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """Numbers or booleans, flat (OIP's form) or nested as the shape. numpy reads the nesting
    (no Python recursion) and refuses lists deeper than its own dimension limit."""
    try:
        values = np.array(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: 'data' is not a regular nested list of numbers") from None
    nested = values.shape if values.ndim > 1 else None
    if values.ndim != 1:
        values = values.reshape(-1)
    if datatype == "UINT64" and values.dtype.kind in "fO":
        values = _uint64_values(name, data)
    resolved = resolve_shape(name, shape, values.size)
    if nested is not None and list(nested) != resolved:
        raise InvalidInput(f"input {name!r}: 'data' nested as {list(nested)} does not match the shape {resolved}")
    return cast_checked(name, values, datatype).reshape(resolved)


def _uint64_values(name: str, data: Any) -> np.ndarray:
    """numpy reads integers past int64 mixed with smaller ones as float64 (losing
    precision) or object; read them exactly, as Python ints."""
    items = np.array(data, dtype=object).reshape(-1).tolist()
    if not all(type(x) is int for x in items):
        raise InvalidInput(f"input {name!r}: UINT64 data must be integers")
    if any(x < 0 or x >= 2**64 for x in items):
        raise InvalidInput(f"input {name!r}: value out of range for UINT64")
    return np.array(items, dtype=np.uint64)


def binary_outputs(request: InferenceRequest) -> tuple[bool, dict[str, bool]]:
    """Which outputs go back as binary: (default, per-output overrides)."""
    default = request.parameters.get("binary_data_output") is True
    per: dict[str, bool] = {}
    if request.outputs:
        for o in request.outputs:
            flag = o.parameters.get("binary_data")
            if isinstance(flag, bool):
                per[o.name] = flag
    return default, per


def encode_infer_response(
    response: InferenceResponse, request: InferenceRequest | None = None
) -> tuple[list[bytes | memoryview], int | None]:
    """Encode a response as body parts and the JSON header length
    (None when no output is binary, i.e. the body is plain JSON)."""
    default, per = binary_outputs(request) if request is not None else (False, {})
    out_docs = []
    buffers: list[bytes | memoryview] = []
    for t in response.outputs:
        doc: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
        params = dict(t.parameters) if t.parameters else {}
        if per.get(t.name, default):
            buf = _binary_view(t)
            params["binary_data_size"] = len(buf)
            buffers.append(buf)
        else:
            doc["data"] = _json_data(t)
        if params:
            doc["parameters"] = params
        out_docs.append(doc)
    body: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        body["model_version"] = response.model_version
    if response.id is not None:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = response.parameters
    body["outputs"] = out_docs
    header = orjson.dumps(body, option=_DUMPS_OPTS)
    if not buffers:
        return [header], None
    return [header, *buffers], len(header)


def _binary_view(t: Tensor) -> bytes | memoryview:
    if t.datatype == "BYTES":
        return encode_bytes_elements(t.data)
    flat = np.ascontiguousarray(t.data, dtype=DTYPES[t.datatype]).reshape(-1)
    return memoryview(flat).cast("B")


def _json_data(t: Tensor) -> Any:
    if t.datatype == "BYTES":
        try:
            return [b.decode() if isinstance(b, bytes) else str(b) for b in t.data.reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {t.name!r} holds bytes that are not UTF-8; request it with binary_data"
            ) from None
    return np.ascontiguousarray(t.data, dtype=DTYPES[t.datatype]).reshape(-1)


def encode_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=_DUMPS_OPTS)
