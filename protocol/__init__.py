"""The Open Inference Protocol v2: types, datatypes, errors and wire codecs.

This package imports nothing from the rest of meshserve.
"""

from meshserve.protocol.datatypes import Datatype
from meshserve.protocol.errors import (
    CapacityExhausted,
    InferenceError,
    InvalidInput,
    ModelExecutionError,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
)
from meshserve.protocol.types import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    RequestedOutput,
    Tensor,
    TensorMetadata,
    Uint64,
)

__all__ = [
    "CapacityExhausted",
    "Datatype",
    "InferenceError",
    "InferenceRequest",
    "InferenceResponse",
    "InvalidInput",
    "ModelExecutionError",
    "ModelMetadata",
    "ModelNotFound",
    "ModelNotReady",
    "PayloadTooLarge",
    "RequestedOutput",
    "Tensor",
    "TensorMetadata",
    "Uint64",
]
