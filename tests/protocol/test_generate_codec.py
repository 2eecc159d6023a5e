"""The generate extension's field mapping alone: Triton's shape fill, and random bodies
that must give a request or an InvalidInput, nothing else."""

from __future__ import annotations

import random

import numpy as np
import pytest
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.generate_codec import decode_generate_request, encode_generate_response, generate_shape
from meshserve.protocol.types import InferenceResponse, Tensor, TensorMetadata

INPUTS = [
    TensorMetadata("x", "FP32", [-1, 2]),
    TensorMetadata("n", "INT8", [1]),
    TensorMetadata("s", "BYTES", [-1]),
    TensorMetadata("b", "BOOL", [2, -1, -1]),
]


@pytest.mark.parametrize(
    "shape, count, expected",
    [([-1], 3, [3]), ([-1, 2], 6, [3, 2]), ([2, -1, -1], 4, [2, 1, 2]), ([1], 1, [1]), ([-1, -1], 5, [1, 5])],
)
def test_shape_fill_as_triton(shape, count, expected):
    assert generate_shape("f", shape, count) == expected


@pytest.mark.parametrize("shape, count", [([-1, 2], 3), ([1], 2), ([2, 3], 5), ([0, -1], 0)])
def test_shapes_that_do_not_fit(shape, count):
    with pytest.raises(InvalidInput, match="'f'"):
        generate_shape("f", shape, count)


def test_a_good_request_and_its_answer():
    req = decode_generate_request(
        {"x": [1, 2, 3, 4], "n": 3, "s": ["a", "b"], "b": [True, False], "t": 0.5, "parameters": {"u": "v"}, "id": "i"},
        "m", None, INPUTS, 100,
    )  # fmt: skip
    got = {t.name: (t.datatype, t.data.shape) for t in req.inputs}
    assert got == {"x": ("FP32", (2, 2)), "n": ("INT8", (1,)), "s": ("BYTES", (2,)), "b": ("BOOL", (2, 1, 1))}
    assert req.parameters == {"u": "v", "t": 0.5} and req.id == "i"
    out = InferenceResponse("m", [Tensor("y", "FP32", np.array([1.5], np.float32)),
                                  Tensor("z", "BYTES", np.array([b"a", b"b"], dtype=object))], id="i")  # fmt: skip
    assert encode_generate_response(out) == {"model_name": "m", "model_version": "", "id": "i", "y": 1.5,
                                             "z": ["a", "b"]}  # fmt: skip


def _value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9)
    if pick == 0:
        return rng.choice([None, {}, {"a": [1]}])
    if pick == 1 and depth < 2:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if pick == 2:
        return rng.choice(["", "é", "x" * 10])
    if pick == 3:
        return rng.choice([True, False])
    if pick == 4:
        return rng.choice([0, -1, 127, 128, 2**63, -(2**70)])
    if pick == 5:
        return rng.choice([0.5, 1e300, -1e-300, float("inf")])
    return [rng.choice([1, 2.5, True, "s"]) for _ in range(rng.randrange(6))]


def test_random_bodies_give_a_request_or_a_400():
    rng = random.Random(20)
    names = ["x", "n", "s", "b", "id", "parameters", "other"]
    for _ in range(3000):
        doc = {rng.choice(names): _value(rng) for _ in range(rng.randrange(1, 6))}
        for inputs in (INPUTS, []):
            try:
                req = decode_generate_request(doc, "m", None, inputs, 8)
            except InvalidInput:
                continue
            for t in req.inputs:
                assert t.data.size <= 8
