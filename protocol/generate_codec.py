"""Triton's generate extension for any model: one flat JSON object in, one out.

A field named like one of the model's inputs becomes that input: a scalar or a flat
list, its datatype and shape from the model's metadata, the shape filled as Triton
does (fixed dimensions divide the element count, the innermost -1 takes what is left,
other -1 become 1). ``parameters`` (an object) and any other field holding a string,
number or boolean pass through as request parameters; ``id`` is the request's id. A
model whose metadata lists no inputs takes every other field as an input whose
datatype follows its JSON values (BYTES, BOOL, INT64, FP64). The response has
``model_name``, ``model_version``, ``id`` and one field per output: a scalar for one
element, else a flat list.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from meshserve.protocol.datatypes import DTYPES, bytes_array, cast_checked
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.types import InferenceRequest, InferenceResponse, Tensor, TensorMetadata

RESERVED = ("id", "parameters")
SCALARS = (str, int, float, bool)


def generate_shape(name: str, shape: list[int], count: int) -> list[int]:
    """Triton's fill of a model input's shape from a field's element count."""
    dims = list(shape)
    left = count
    for d in reversed(dims):
        if d != -1:
            if d <= 0 or left % d:
                raise InvalidInput(f"field {name!r}: {count} values do not fit the input's shape {list(shape)}")
            left //= d
    for i in range(len(dims) - 1, -1, -1):
        if dims[i] == -1:
            dims[i], left = left, 1
    if left != 1:
        raise InvalidInput(f"field {name!r}: {count} values do not fit the input's shape {list(shape)}")
    return dims


def _guess_datatype(name: str, values: list[Any]) -> str:
    kinds = {type(v) for v in values}
    if kinds <= {str}:
        return "BYTES"
    if kinds <= {bool}:
        return "BOOL"
    if kinds <= {int}:
        return "INT64"
    if kinds <= {int, float}:
        return "FP64"
    raise InvalidInput(f"field {name!r}: values must be all strings, all booleans or all numbers")


def _tensor(name: str, value: Any, meta: TensorMetadata | None, max_elements: int) -> Tensor:
    if isinstance(value, list):
        values = value
        if any(isinstance(v, (list, dict)) or v is None for v in values):
            raise InvalidInput(f"field {name!r} must be a scalar or a flat list of scalars")
    elif isinstance(value, SCALARS):
        values = [value]
    else:
        raise InvalidInput(f"field {name!r} must be a scalar or a flat list of scalars")
    if len(values) > max_elements:
        raise InvalidInput(f"field {name!r}: more than {max_elements} values")
    if meta is None:
        datatype, shape = _guess_datatype(name, values), [len(values)]
    else:
        datatype, shape = meta.datatype, generate_shape(name, meta.shape, len(values))
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidInput(f"field {name!r}: the input is BYTES, its values must be strings")
        return Tensor(name, datatype, bytes_array([v.encode() for v in values], shape))
    if datatype not in DTYPES:
        raise InvalidInput(f"field {name!r}: the input's datatype {datatype} cannot be given in a generate request")
    if any(isinstance(v, str) for v in values):
        raise InvalidInput(f"field {name!r}: the input is {datatype}, its values must not be strings")
    try:
        array = np.array(values)
        return Tensor(name, datatype, cast_checked(name, array, datatype).reshape(shape))
    except InvalidInput as e:
        raise InvalidInput(f"field {name!r}: {e.message}") from None


def decode_generate_request(
    doc: dict[str, Any], model_name: str, model_version: str | None, inputs: list[TensorMetadata], max_elements: int
) -> InferenceRequest:
    """The request for ``model_name``, whose inputs are ``inputs`` (its metadata)."""
    params = doc.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise InvalidInput("field 'parameters' must be an object")
    params = dict(params)
    for k, v in params.items():
        if not isinstance(v, SCALARS):
            raise InvalidInput(f"parameter {k!r} must be a string, number or boolean")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput("field 'id' must be a string")
    by_name = {t.name: t for t in inputs}
    tensors = []
    for name, value in doc.items():
        if name in RESERVED and name not in by_name:
            continue
        meta = by_name.get(name)
        if meta is None and by_name:
            if not isinstance(value, SCALARS):
                raise InvalidInput(
                    f"field {name!r} is not an input of model {model_name!r} (inputs: {', '.join(by_name)}) "
                    "and a parameter must be a string, number or boolean"
                )
            if name in params:
                raise InvalidInput(f"field {name!r} is given both at the top level and in 'parameters'")
            params[name] = value
            continue
        tensors.append(_tensor(name, value, meta, max_elements))
    given = {t.name for t in tensors}
    missing = [n for n in by_name if n not in given]
    if missing:
        raise InvalidInput(f"missing field {missing[0]!r}: an input of model {model_name!r}")
    if not tensors:
        raise InvalidInput(f"the generate request has no input for model {model_name!r}")
    return InferenceRequest(model_name, tensors, model_version=model_version, id=rid, parameters=params)


def encode_generate_response(response: InferenceResponse) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version or ""}
    if response.id:
        doc["id"] = response.id
    for t in response.outputs:
        if t.datatype == "BYTES":
            try:
                values = [b.decode() if isinstance(b, bytes) else str(b) for b in t.data.reshape(-1)]
            except UnicodeDecodeError:
                raise InvalidInput(f"output {t.name!r} holds bytes that are not UTF-8") from None
        else:
            values = np.asarray(t.data).reshape(-1).tolist()
        doc[t.name] = values[0] if len(values) == 1 else values
    return doc
