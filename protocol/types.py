"""Transport-neutral request/response types. Tensors are numpy arrays, already shaped.

Plain slotted classes rather than pydantic models: these are built for every
request on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from meshserve.protocol.datatypes import datatype_of

Parameters = dict[str, Any]


class Uint64(int):
    """An int that travels as gRPC ``uint64_param`` (plain ints go as int64)."""


class Tensor:
    """A named tensor. ``data`` is a numpy array of the tensor's shape; BYTES
    tensors are object arrays of ``bytes``. Arrays decoded from the wire are
    read-only views of the request body."""

    __slots__ = ("name", "datatype", "data", "parameters")

    def __init__(self, name: str, datatype: str, data: np.ndarray, parameters: Parameters | None = None) -> None:
        self.name = name
        self.datatype = datatype
        self.data = data
        self.parameters = parameters or {}

    @classmethod
    def from_numpy(cls, name: str, data: Any, parameters: Parameters | None = None) -> Tensor:
        """Wrap an array (or anything numpy accepts), inferring the datatype."""
        arr = data if isinstance(data, np.ndarray) else np.asarray(data)
        if arr.dtype.kind in "SU":
            from meshserve.protocol.datatypes import as_bytes, bytes_array

            arr = bytes_array([as_bytes(x) for x in arr.reshape(-1)], arr.shape)
        return cls(name, datatype_of(arr), arr, parameters)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype}, shape={self.shape})"


class RequestedOutput:
    __slots__ = ("name", "parameters")

    def __init__(self, name: str, parameters: Parameters | None = None) -> None:
        self.name = name
        self.parameters = parameters or {}


class InferenceRequest:
    __slots__ = ("model_name", "model_version", "id", "inputs", "outputs", "parameters")

    def __init__(
        self,
        model_name: str,
        inputs: list[Tensor],
        *,
        model_version: str | None = None,
        id: str | None = None,
        outputs: list[RequestedOutput] | None = None,
        parameters: Parameters | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.inputs = inputs
        self.outputs = outputs
        self.parameters = parameters or {}

    def input(self, name: str) -> Tensor:
        """The input of that name; a missing one is the client's error."""
        for t in self.inputs:
            if t.name == name:
                return t
        from meshserve.protocol.errors import InvalidInput

        raise InvalidInput(f"request has no input named {name!r}")


class InferenceResponse:
    __slots__ = ("model_name", "model_version", "id", "outputs", "parameters")

    def __init__(
        self,
        model_name: str,
        outputs: list[Tensor],
        *,
        model_version: str | None = None,
        id: str | None = None,
        parameters: Parameters | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.outputs = outputs
        self.parameters = parameters or {}


@dataclass
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class ModelMetadata:
    name: str
    versions: list[str] = field(default_factory=list)
    platform: str = ""
    inputs: list[TensorMetadata] = field(default_factory=list)
    outputs: list[TensorMetadata] = field(default_factory=list)
    parameters: Parameters = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.parameters:
            d["parameters"] = self.parameters
        return d
