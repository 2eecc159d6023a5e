"""Declared inputs/outputs: the data plane validates requests against them."""

import numpy as np

from meshserve import InferenceRequest, Model


class AddSub(Model):
    def predict(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        a = request.input("INPUT0").data
        b = request.input("INPUT1").data
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
