"""scikit-learn models saved with joblib (or pickle).

Requested outputs choose the method, as in MLServer: ``predict`` (default),
``predict_proba``, ``decision_function``, ``transform``; or set the
``method`` parameter in the model settings.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from meshserve.protocol.errors import InvalidInput, ModelLoadError
from meshserve.protocol.types import InferenceRequest, Tensor
from meshserve.server.runtimes.base import Model
from meshserve.server.runtimes.files import SKLEARN_SUFFIXES, find_model_file
from meshserve.server.runtimes.tabular import feature_matrix, wanted_methods

MODEL_SUFFIXES = SKLEARN_SUFFIXES
METHODS = ("predict", "predict_proba", "decision_function", "transform")


class SKLearnModel(Model):
    supports_batching = True

    def load(self) -> None:
        import joblib

        assert self.path is not None
        file = find_model_file(self.path, SKLEARN_SUFFIXES, self.parameters.get("file"))
        try:
            self._model: Any = joblib.load(file)
        except Exception as e:
            raise ModelLoadError(f"cannot read {file.name}: {type(e).__name__}: {e}") from e
        self._default = self.parameters.get("method", "predict")
        if self._default not in METHODS or not hasattr(self._model, self._default):
            raise ModelLoadError(f"model has no method {self._default!r}")
        self._size = len(pickle.dumps(self._model, protocol=pickle.HIGHEST_PROTOCOL))

    def size_bytes(self) -> int:
        return self._size

    def predict(self, request: InferenceRequest) -> list[Tensor]:
        x = feature_matrix(self.name, request)
        outputs = []
        for method in wanted_methods(request, self._default):
            if method not in METHODS or not hasattr(self._model, method):
                raise InvalidInput(f"model {self.name!r} has no output {method!r}")
            outputs.append(Tensor.from_numpy(method, np.asarray(getattr(self._model, method)(x))))
        return outputs

    def unload(self) -> None:
        self._model = None
