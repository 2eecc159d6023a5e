"""Triton's generate extension on a plain Python model (not a language model): JSON
fields -> inputs by name (datatype and shape from the model's metadata), parameters
through, outputs back as fields; generate_stream answers one event; bad fields are
400s naming the field. (tritonclient has no generate call: plain HTTP here.)"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.prod.conftest import write_model
from tests.support.server import EXAMPLES, RunningServer, start_server

CALC = """
import numpy as np

from meshserve import InferenceRequest, Model


class Calc(Model):
    async def predict(self, request: InferenceRequest):
        x = {t.name: t.data for t in request.inputs}
        offset = float(request.parameters.get("offset", 0))
        return {
            "y": (x["x"] * x["scale"].reshape(-1)[0] + offset).astype(np.float32),
            "shape": np.asarray(x["x"].shape, dtype=np.int64),
            "text": np.asarray([x["label"].reshape(-1)[0].upper()], dtype=object),
        }
"""
INPUTS = [
    {"name": "x", "datatype": "FP32", "shape": [-1, 2]},
    {"name": "scale", "datatype": "FP32", "shape": [1]},
    {"name": "label", "datatype": "BYTES", "shape": [1]},
]
OUTPUTS = [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}, {"name": "text", "datatype": "BYTES", "shape": [1]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    import shutil

    base = tmp_path_factory.mktemp("generate-any")
    models = base / "models"
    write_model(models, "calc", CALC, "Calc", inputs=INPUTS, outputs=OUTPUTS)
    shutil.copytree(EXAMPLES / "echo", models / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    srv = start_server(models, base / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


GOOD = {"id": "r1", "x": [1, 2, 3, 4], "scale": 2, "label": "hello", "offset": 1}


def test_generate_maps_fields_to_inputs_and_outputs_to_fields(http):
    r = http.post("/v2/models/calc/generate", json=GOOD, headers={"x-request-id": "gen-any"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "gen-any"
    # x filled into [-1, 2] as Triton does: 4 values -> [2, 2]; offset passed on as a parameter
    assert r.json() == {"model_name": "calc", "model_version": "", "id": "r1", "y": [3.0, 5.0, 7.0, 9.0],
                        "shape": [2, 2], "text": "HELLO"}  # fmt: skip
    # parameters in their own object, scalars for one-element inputs given as lists
    nested = {"x": [1, 2], "scale": [3], "label": ["ab"], "parameters": {"offset": 0.5}}
    doc = http.post("/v2/models/calc/generate", json=nested).json()
    assert doc["y"] == [3.5, 6.5] and doc["shape"] == [1, 2] and "id" not in doc


def test_generate_stream_answers_one_event(http):
    with http.stream("POST", "/v2/models/calc/generate_stream", json=GOOD) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    import json

    assert json.loads(lines[0][len("data: ") :])["y"] == [3.0, 5.0, 7.0, 9.0]


def test_a_model_without_metadata_takes_the_fields_types(http):
    r = http.post("/v2/models/echo/generate", json={"a": [1, 2, 3], "s": "hi", "f": 1.5, "b": [True, False]})
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": "echo", "model_version": "", "a": [1, 2, 3], "s": "hi", "f": 1.5,
                        "b": [True, False]}  # fmt: skip


@pytest.mark.parametrize(
    "body, field",
    [
        ({**GOOD, "x": [1, 2, 3]}, "x"),  # 3 values do not fill [-1, 2]
        ({**GOOD, "x": ["a", "b"]}, "x"),
        ({**GOOD, "x": [[1, 2], [3, 4]]}, "x"),  # a flat list, as Triton takes it
        ({**GOOD, "scale": [1, 2]}, "scale"),
        ({**GOOD, "label": 3}, "label"),
        ({**GOOD, "x": [1, 2, None, 4]}, "x"),
        ({**GOOD, "scale": 1e300}, "scale"),  # past FP32
        ({k: v for k, v in GOOD.items() if k != "scale"}, "scale"),
        ({**GOOD, "extra": {"a": 1}}, "extra"),
        ({**GOOD, "parameters": [1]}, "parameters"),
        ({**GOOD, "parameters": {"p": [1]}}, "p"),
        ({**GOOD, "id": 7}, "id"),
        ({**GOOD, "parameters": {"offset": 2}}, "offset"),  # both at the top level and in parameters
    ],
)
def test_bad_fields_are_400_naming_the_field(http, body, field):
    for path in ("generate", "generate_stream"):
        r = http.post(f"/v2/models/calc/{path}", json=body)
        assert r.status_code == 400, (path, r.text)
        assert f"'{field}'" in r.json()["error"], r.text


def test_bad_bodies_and_unknown_models(http):
    assert http.post("/v2/models/nope/generate", json=GOOD).status_code == 404
    r = http.post("/v2/models/calc/generate", content=b"[1, 2]")
    assert r.status_code == 400 and "error" in r.json()
    r = http.post("/v2/models/calc/generate", content=b"{bad json")
    assert r.status_code == 400 and "error" in r.json()
    r = http.post("/v2/models/echo/generate", json={})
    assert r.status_code == 400 and "no input" in r.json()["error"]
    # the plain infer of the same model still answers as before
    infer = {"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}]}
    assert http.post("/v2/models/echo/infer", json=infer).json()["outputs"][0]["data"] == [1]
