"""What the tabular runtimes (scikit-learn, XGBoost, LightGBM) read from a request:
one feature matrix, and the methods its requested outputs name."""

from __future__ import annotations

import numpy as np
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.types import InferenceRequest


def feature_matrix(model: str, request: InferenceRequest) -> np.ndarray:
    """The request's single input as a 2-D matrix (a 1-D input is one row)."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {model!r} takes one input tensor, got {len(request.inputs)}")
    x = request.inputs[0].data
    return x.reshape(1, -1) if x.ndim == 1 else x


def wanted_methods(request: InferenceRequest, default: str) -> list[str]:
    """Requested outputs name the methods to call (as in MLServer); none asks for ``default``."""
    return [o.name for o in request.outputs] if request.outputs else [default]
