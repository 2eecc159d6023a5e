"""Pre- and post-processing hooks around a threaded predict, as KServe's Model offers."""

import numpy as np

from meshserve import InferenceRequest, Model, Tensor


class Scaled(Model):
    def load(self) -> None:
        self.factor = float(self.parameters.get("factor", 1.0))

    async def preprocess(self, request: InferenceRequest) -> np.ndarray:
        return request.inputs[0].data.astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x * self.factor

    def postprocess(self, y: np.ndarray) -> list[Tensor]:
        return [Tensor.from_numpy("scaled", y), Tensor.from_numpy("total", np.array([y.sum()]))]
