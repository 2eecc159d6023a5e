"""An identity model: every input comes back as an output of the same name."""

from meshserve import InferenceRequest, Model, Tensor


class EchoModel(Model):
    async def predict(self, request: InferenceRequest) -> list[Tensor]:
        return request.inputs
