"""What a model's predict may return, and what the data plane makes of it: every form
becomes outputs whose arrays agree with their datatypes; anything else is the model's
error (a 500 that names the model), never a crash of the codec later."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput, ModelExecutionError
from meshserve.protocol.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from meshserve.server.loaded_model import LoadedModel
from meshserve.server.model_settings import ModelSettings
from meshserve.server.observe import PhaseTimers
from meshserve.server.runtimes.base import Model

EXECUTOR = ThreadPoolExecutor(1)


class Returns(Model):
    """Returns whatever ``self.result`` is (set by the test)."""

    result: object = None

    async def predict(self, request: InferenceRequest) -> object:
        return self.result


def served(result: object, outputs: list[str] | None = None) -> InferenceResponse:
    model = Returns(ModelSettings(name="m"))
    model.result = result
    loaded = LoadedModel(model, 0, PhaseTimers())
    request = InferenceRequest("m", [Tensor.from_numpy("x", np.zeros(2, np.float32))], id="r1",
                               outputs=[RequestedOutput(o) for o in outputs] if outputs else None)  # fmt: skip
    return asyncio.run(loaded.infer(request, EXECUTOR))


def test_a_list_of_tensors_passes_through_and_is_made_to_agree_with_its_datatypes():
    same = Tensor("a", "FP32", np.ones(3, np.float32))
    wider = Tensor("b", "FP32", np.ones(3, np.float64))  # labelled FP32, made of float64
    listed = Tensor("c", "INT64", [1, 2, 3])  # not even an array
    text = Tensor("d", "BYTES", np.array(["x", "yz"]))
    r = served([same, wider, listed, text])
    assert [t.name for t in r.outputs] == ["a", "b", "c", "d"] and r.id == "r1" and r.model_name == "m"
    assert r.outputs[0] is same  # nothing to do: the very tensor
    assert r.outputs[1].data.dtype == np.float32 and r.outputs[2].data.dtype == np.int64
    assert r.outputs[3].data.dtype == object and list(r.outputs[3].data) == [b"x", b"yz"]
    assert served((same,)).outputs == [same]  # a tuple too


@pytest.mark.parametrize(
    "result",
    [[Tensor("a", "FP32", np.ones(1, np.float32)), np.ones(1)], ["a"], 3.0, None, "text"],
    ids=["list-with-an-array", "list-of-str", "float", "none", "str"],
)
def test_anything_else_is_the_models_error(result):
    with pytest.raises(ModelExecutionError, match=r"model 'm' returned \w+; expected an InferenceResponse"):
        served(result)


def test_an_unknown_or_uncastable_datatype_is_the_models_error():
    with pytest.raises(ModelExecutionError, match="unknown datatype 'FLOAT'"):
        served([Tensor("a", "FLOAT", np.ones(1, np.float32))])
    with pytest.raises(ModelExecutionError, match="output 'a' is not INT32"):
        served([Tensor("a", "INT32", np.array(["x"], dtype=object))])


def test_dicts_arrays_and_responses_and_picking_outputs():
    r = served({"y": np.arange(3), "z": Tensor("z", "FP32", np.zeros(1, np.float64))})
    assert [(t.name, t.datatype, t.data.dtype) for t in r.outputs] == [
        ("y", "INT64", np.int64), ("z", "FP32", np.float32)]  # fmt: skip
    assert served(np.ones(2, np.float32)).outputs[0].name == "output0"
    given = InferenceResponse("m", [Tensor("y", "FP64", np.ones(1))], parameters={"k": 1})
    assert served(given).parameters == {"k": 1}
    assert [t.name for t in served({"y": np.ones(1), "z": np.ones(1)}, outputs=["z"]).outputs] == ["z"]
    with pytest.raises(InvalidInput, match="has no output 'w'; it produced y"):
        served({"y": np.ones(1)}, outputs=["w"])


def test_a_request_that_did_not_wait_is_counted_in_the_first_queue_bucket():
    model = Returns(ModelSettings(name="m"))
    model.result = [Tensor("a", "FP32", np.ones(1, np.float32))]
    timers = PhaseTimers()
    loaded = LoadedModel(model, 0, timers)
    request = InferenceRequest("m", [Tensor.from_numpy("x", np.zeros(1, np.float32))])
    for _ in range(3):
        asyncio.run(loaded.infer(request, EXECUTOR))
    queue = timers.hists["queue"]
    assert queue.counts[0] == 3 and sum(queue.counts) == 3 and queue.sum == 0.0
    assert sum(timers.hists["predict"].counts) == 3
