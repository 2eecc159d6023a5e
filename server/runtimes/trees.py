"""What the gradient-boosting runtimes share: ``predict`` vs ``predict_proba``
chosen per request (requested outputs, as in the scikit-learn runtime) or by the
``method`` parameter, and a signature of one FP32 ``[-1, n_features]`` input."""

from __future__ import annotations

from typing import Any

import numpy as np
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, ModelMetadata, Tensor, TensorMetadata
from meshserve.server.runtimes.base import Model
from meshserve.server.runtimes.tabular import feature_matrix, wanted_methods

METHODS = ("predict", "predict_proba")


class TreeModel(Model):
    """Subclasses set ``_classifier``, ``_n_features``, ``_n_classes``, ``_size`` in ``load``
    and implement ``_predict_raw`` (labels or values) and ``_predict_proba``."""

    supports_batching = True
    _platform = ""

    def _finish_load(self) -> None:
        self._default = self.parameters.get("method", "predict")
        if self._default not in METHODS:
            raise ModelLoadError(f"unknown method {self._default!r}; expected one of {', '.join(METHODS)}")
        if self._default == "predict_proba" and not self._classifier:
            raise ModelLoadError("method 'predict_proba' needs a classifier; this model is a regressor")

    def metadata(self) -> ModelMetadata:
        meta = self.settings.metadata()
        meta.platform = self.settings.platform or self._platform
        if not meta.inputs:
            meta.inputs = [TensorMetadata("input0", "FP32", [-1, self._n_features])]
        if not meta.outputs:
            label = "INT64" if self._classifier else "FP32"
            meta.outputs = [TensorMetadata("predict", label, [-1])]
            if self._classifier:
                meta.outputs.append(TensorMetadata("predict_proba", "FP32", [-1, self._n_classes]))
        return meta

    def size_bytes(self) -> int:
        return self._size

    def predict(self, request: InferenceRequest) -> list[Tensor]:
        x = feature_matrix(self.name, request)
        if x.ndim != 2 or x.shape[1] != self._n_features:
            raise InvalidInput(f"model {self.name!r} takes [-1, {self._n_features}] features, got {list(x.shape)}")
        out = []
        for method in wanted_methods(request, self._default):
            if method == "predict":
                out.append(Tensor.from_numpy(method, self._predict_raw(x)))
            elif method == "predict_proba" and self._classifier:
                out.append(Tensor.from_numpy(method, self._predict_proba(x).astype(np.float32)))
            else:
                raise InvalidInput(f"model {self.name!r} has no output {method!r}")
        return out

    def _predict_raw(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError
