"""meshserve's public API: what user code imports.

from meshserve import Model, InferenceRequest, Tensor
"""

from meshserve.protocol.errors import InferenceError, InvalidInput, ModelExecutionError
from meshserve.protocol.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.model_settings import ModelSettings
from meshserve.server.process import serve
from meshserve.server.runtimes.base import Model
from meshserve.server.settings import Settings
from meshserve.server.version import __version__

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
