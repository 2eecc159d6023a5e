"""A model that fails in predict, to check the server stays up."""

from meshserve import InferenceRequest, Model


class Raises(Model):
    def predict(self, request: InferenceRequest):
        raise ValueError("this model always fails")
