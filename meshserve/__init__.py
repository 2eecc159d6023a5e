"""meshserve's public API: what user code imports.

from meshserve import Model, InferenceRequest, Tensor
"""

from protocol.errors import InferenceError, InvalidInput, ModelExecutionError
from protocol.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor, TensorMetadata
from server.model_settings import ModelSettings
from server.process import serve
from server.runtimes.base import Model
from server.settings import Settings
from server.version import __version__

__all__ = [
    "InferenceError",
    "InferenceRequest",
    "InferenceResponse",
    "InvalidInput",
    "Model",
    "ModelExecutionError",
    "ModelMetadata",
    "ModelSettings",
    "Settings",
    "Tensor",
    "TensorMetadata",
    "__version__",
    "serve",
]
