"""tritonclient.http against a real meshserve: health, metadata, every datatype in
every binary/JSON combination, the example and test models, and error statuses."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.datasets import load_iris
from tritonclient.utils import InferenceServerException

from tests.clients.cases import (
    BINARY_ONLY,
    DATATYPES,
    JSON_SAFE,
    SHAPES,
    as_bytes_list,
    assert_same_tensor,
    binary_modes,
    sample,
)


def make_input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def echo(client, array: np.ndarray, datatype: str, binary_in: bool, binary_out: bool, name: str = "x"):
    out = httpclient.InferRequestedOutput(name, binary_data=binary_out)
    return client.infer("echo", [make_input(name, array, datatype, binary_in)], outputs=[out])


def fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


# -- health and metadata ---------------------------------------------------------


def test_health(http_client):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()


@pytest.mark.parametrize("model", ["echo", "iris", "typed", "raises", "hooks"])
def test_every_model_is_ready(http_client, model):
    assert http_client.is_model_ready(model)


def test_model_ready_by_version(http_client):
    assert http_client.is_model_ready("typed", "1")
    assert not http_client.is_model_ready("typed", "2")
    assert not http_client.is_model_ready("no-such-model")


def test_server_metadata(http_client):
    meta = http_client.get_server_metadata()
    assert meta["name"] == "meshserve"
    assert isinstance(meta["version"], str) and meta["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_iris_metadata(http_client):
    meta = http_client.get_model_metadata("iris")
    assert meta["name"] == "iris"
    assert meta["inputs"] == [{"name": "input0", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "predict": ("INT64", [-1]),
        "predict_proba": ("FP64", [-1, 3]),
    }


@pytest.mark.parametrize("version", ["", "1"])
def test_typed_metadata(http_client, version):
    meta = http_client.get_model_metadata("typed", version)
    assert meta["name"] == "typed"
    assert meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "FP32", [-1, 3]),
        ("INPUT1", "FP32", [-1, 3]),
    ]
    assert [t["name"] for t in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]


@pytest.mark.parametrize("model,version", [("no-such-model", ""), ("typed", "2"), ("echo", "7")])
def test_metadata_of_unknown_model_is_404(http_client, model, version):
    e = fails(http_client.get_model_metadata, model, version)
    assert e.status() == "404"
    assert repr(model) in e.message()


# -- datatypes through echo -----------------------------------------------------


@pytest.mark.parametrize("binary_in,binary_out", binary_modes())
@pytest.mark.parametrize("datatype", DATATYPES)
def test_echo_every_datatype(http_client, datatype, binary_in, binary_out):
    array = JSON_SAFE[datatype]
    result = echo(http_client, array, datatype, binary_in, binary_out)
    out = result.get_output("x")
    assert out["datatype"] == datatype
    assert out["shape"] == list(array.shape)
    assert ("binary_data_size" in out.get("parameters", {})) is binary_out
    assert ("data" in out) is not binary_out
    assert_same_tensor(result.as_numpy("x"), array, datatype)


@pytest.mark.parametrize(
    "values",
    [[2**63, 1], [2**64 - 1, 0], [0, 2**63 + 5, 2**64 - 1], [2**64 - 1]],
    ids=["2^63-and-1", "max-and-0", "mixed", "max-alone"],
)
@pytest.mark.parametrize("binary_out", [True, False])
def test_uint64_json_above_int64_max(http_client, values, binary_out):
    """UINT64 JSON data holding values >= 2**63 next to smaller ones is valid UINT64 data."""
    array = np.array(values, dtype=np.uint64)
    result = echo(http_client, array, "UINT64", False, binary_out)
    assert_same_tensor(result.as_numpy("x"), array, "UINT64")


@pytest.mark.parametrize("datatype", sorted(BINARY_ONLY))
def test_echo_binary_only_values(http_client, datatype):
    """NaN, infinities and non-UTF-8 bytes: JSON cannot carry them, binary must."""
    array = BINARY_ONLY[datatype]
    assert_same_tensor(echo(http_client, array, datatype, True, True).as_numpy("x"), array, datatype)


@pytest.mark.parametrize("binary_in,binary_out", binary_modes())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT64", "FP16", "FP64", "BYTES"])
def test_echo_odd_shapes(http_client, datatype, shape, binary_in, binary_out):
    array = sample(datatype, shape)
    result = echo(http_client, array, datatype, binary_in, binary_out)
    assert result.get_output("x")["shape"] == list(shape)
    assert result.get_output("x")["datatype"] == datatype
    assert_same_tensor(result.as_numpy("x"), array, datatype)


@pytest.mark.parametrize("binary_in,binary_out", binary_modes())
def test_echo_large_fp32(http_client, binary_in, binary_out):
    array = np.random.default_rng(0).standard_normal((1, 150528)).astype(np.float32)
    result = echo(http_client, array, "FP32", binary_in, binary_out)
    assert_same_tensor(result.as_numpy("x"), array, "FP32")


def test_echo_16mib_binary(http_client):
    array = np.random.default_rng(1).standard_normal((4, 1 << 20)).astype(np.float32)
    assert_same_tensor(echo(http_client, array, "FP32", True, True).as_numpy("x"), array, "FP32")


def test_echo_many_inputs_mixed_binary_and_json(http_client):
    """Binary buffers interleaved with JSON inputs: each buffer must land on its own input."""
    tensors = {
        "a": (np.arange(6, dtype=np.int32).reshape(2, 3), "INT32", True),
        "b": (np.array([0.25, -8.5]), "FP64", False),
        "c": (np.array([b"one", b"", b"three"], dtype=object), "BYTES", True),
        "d": (np.array([[True], [False]]), "BOOL", False),
        "e": (np.array([65535, 0], dtype=np.uint16), "UINT16", True),
    }
    inputs = [make_input(n, a, dt, b) for n, (a, dt, b) in tensors.items()]
    names = list(reversed(tensors))  # ask for the outputs in another order
    outputs = [httpclient.InferRequestedOutput(n, binary_data=i % 2 == 0) for i, n in enumerate(names)]
    result = http_client.infer("echo", inputs, outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    for n, (array, datatype, _) in tensors.items():
        assert_same_tensor(result.as_numpy(n), array, datatype)


def test_default_outputs_come_back_binary(http_client):
    """With no outputs listed tritonclient asks for binary_data_output: every output binary."""
    inputs = [make_input("p", np.array([1, 2], np.int8), "INT8", False), make_input("q", np.ones(3), "FP64")]
    result = http_client.infer("echo", inputs)
    for o in result.get_response()["outputs"]:
        assert "data" not in o and o["parameters"]["binary_data_size"] > 0
    np.testing.assert_array_equal(result.as_numpy("p"), [1, 2])
    np.testing.assert_array_equal(result.as_numpy("q"), np.ones(3))


# -- request id, parameters, response fields -----------------------------------------


def test_request_id_is_echoed(http_client):
    result = http_client.infer("echo", [make_input("x", np.zeros(1, np.float32), "FP32")], request_id="id-\u00e9-42")
    assert result.get_response()["id"] == "id-\u00e9-42"
    assert result.get_response()["model_name"] == "echo"


def test_no_request_id_no_id(http_client):
    result = http_client.infer("echo", [make_input("x", np.zeros(1, np.float32), "FP32")])
    assert "id" not in result.get_response()


@pytest.mark.parametrize(
    "parameters",
    [{"an_int": 7}, {"a_str": "text"}, {"a_bool": True}, {"a_float": 0.5}, {"n": -1, "s": "", "b": False, "f": 1e300}],
    ids=["int", "str", "bool", "float", "mixed"],
)
def test_request_parameters_are_accepted(http_client, parameters):
    array = np.array([3, 4], np.int64)
    result = http_client.infer("echo", [make_input("x", array, "INT64")], parameters=parameters)
    np.testing.assert_array_equal(result.as_numpy("x"), array)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sequence_id": 42, "sequence_start": True, "sequence_end": False},
        {"sequence_id": "correlation-7", "sequence_start": False, "sequence_end": True},
        {"priority": 2},
        {"timeout": 5_000_000},
    ],
    ids=["sequence-int", "sequence-str", "priority", "timeout"],
)
def test_tritonclient_scheduling_arguments_are_accepted(http_client, kwargs):
    """tritonclient turns these arguments into request parameters; a server without
    sequence batching or priorities must still answer."""
    array = np.array([1.5], np.float32)
    result = http_client.infer("echo", [make_input("x", array, "FP32")], **kwargs)
    assert_same_tensor(result.as_numpy("x"), array, "FP32")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_body(http_client, algorithm):
    """tritonclient can compress the request body (Content-Encoding), as Triton accepts."""
    array = np.arange(100, dtype=np.float32)
    inp = make_input("x", array, "FP32")
    result = http_client.infer("echo", [inp], request_compression_algorithm=algorithm)
    assert_same_tensor(result.as_numpy("x"), array, "FP32")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_response_accepted(http_client, algorithm):
    array = np.arange(100, dtype=np.float32)
    result = http_client.infer("echo", [make_input("x", array, "FP32")], response_compression_algorithm=algorithm)
    assert_same_tensor(result.as_numpy("x"), array, "FP32")


# -- the example and test models ---------------------------------------------------


@pytest.fixture(scope="module")
def iris_reference(model_dir):
    """The very model the server loaded, and the iris data."""
    x, y = load_iris(return_X_y=True)
    return joblib.load(model_dir / "iris" / "model.joblib"), x.astype(np.float32), y


@pytest.mark.parametrize("binary_in", [True, False])
def test_iris_predictions(http_client, iris_reference, binary_in):
    model, x, y = iris_reference
    outputs = [httpclient.InferRequestedOutput(n, binary_data=not binary_in) for n in ("predict", "predict_proba")]
    result = http_client.infer("iris", [make_input("input0", x, "FP32", binary_in)], outputs=outputs)
    predict, proba = result.as_numpy("predict"), result.as_numpy("predict_proba")
    assert result.get_output("predict")["datatype"] == "INT64"
    assert result.get_output("predict_proba")["datatype"] == "FP64"
    assert predict.shape == (150,) and proba.shape == (150, 3)
    np.testing.assert_array_equal(predict, np.argmax(proba, axis=1))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(predict, model.predict(x))
    np.testing.assert_allclose(proba, model.predict_proba(x), rtol=1e-9, atol=1e-12)
    assert (predict == y).mean() > 0.9


def test_iris_default_output_is_predict(http_client, iris_reference):
    model, x, _ = iris_reference
    result = http_client.infer("iris", [make_input("input0", x[:5], "FP32")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict"]
    np.testing.assert_array_equal(result.as_numpy("predict"), model.predict(x[:5]))


def test_iris_only_proba(http_client, iris_reference):
    model, x, _ = iris_reference
    out = [httpclient.InferRequestedOutput("predict_proba")]
    result = http_client.infer("iris", [make_input("input0", x[:1], "FP32")], outputs=out)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict_proba"]
    assert result.as_numpy("predict_proba").shape == (1, 3)


def typed_inputs(a: np.ndarray, b: np.ndarray, binary: bool = True) -> list[httpclient.InferInput]:
    return [make_input("INPUT0", a, "FP32", binary), make_input("INPUT1", b, "FP32", binary)]


@pytest.mark.parametrize("version", ["", "1"])
@pytest.mark.parametrize("binary", [True, False])
def test_typed_add_sub(http_client, version, binary):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    result = http_client.infer("typed", typed_inputs(a, b, binary), model_version=version)
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_typed_one_requested_output(http_client):
    a = b = np.ones((1, 3), np.float32)
    out = [httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    result = http_client.infer("typed", typed_inputs(a, b), outputs=out)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 3), np.float32))


def test_hooks_model(http_client):
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    result = http_client.infer("hooks", [make_input("x", x, "FP32")])
    assert result.get_output("scaled")["datatype"] == "FP64"
    np.testing.assert_allclose(result.as_numpy("scaled"), x.astype(np.float64) * 2.5)
    np.testing.assert_allclose(result.as_numpy("total"), [x.sum() * 2.5])


# -- errors ---------------------------------------------------------------------------

F32 = np.zeros((2, 3), np.float32)

TYPED_ERRORS = [
    pytest.param([("INPUT0", F32.astype(np.float64), "FP64"), ("INPUT1", F32, "FP32")], None, "FP32", id="datatype"),
    pytest.param([("INPUT0", np.zeros((2, 4), np.float32), "FP32"), ("INPUT1", F32, "FP32")], None, "shape", id="dim"),
    pytest.param([("INPUT0", np.zeros(3, np.float32), "FP32"), ("INPUT1", F32, "FP32")], None, "shape", id="rank"),
    pytest.param([("INPUT0", F32, "FP32")], None, "INPUT1", id="missing"),
    pytest.param(
        [("INPUT0", F32, "FP32"), ("INPUT1", F32, "FP32"), ("INPUT2", F32, "FP32")], None, "INPUT2", id="extra"
    ),
    pytest.param([("INPUT0", F32, "FP32"), ("INPUT1", F32, "FP32")], "OUTPUT9", "OUTPUT9", id="unknown-output"),
]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("tensors,output,words", TYPED_ERRORS)
def test_typed_validation_is_400(http_client, tensors, output, words, binary):
    inputs = [make_input(n, a, dt, binary) for n, a, dt in tensors]
    outputs = [httpclient.InferRequestedOutput(output)] if output else None
    e = fails(http_client.infer, "typed", inputs, outputs=outputs)
    assert e.status() == "400"
    assert words in e.message()


@pytest.mark.parametrize(
    "model,version", [("no-such-model", ""), ("typed", "2"), ("echo", "3")], ids=["model", "version", "unversioned"]
)
def test_infer_unknown_model_is_404(http_client, model, version):
    e = fails(http_client.infer, model, [make_input("x", F32, "FP32")], model_version=version)
    assert e.status() == "404"
    assert model in e.message()


def test_unknown_output_of_iris_is_400(http_client):
    out = [httpclient.InferRequestedOutput("no_such_output")]
    e = fails(http_client.infer, "iris", [make_input("input0", np.zeros((1, 4), np.float32), "FP32")], outputs=out)
    assert e.status() == "400"
    assert "no_such_output" in e.message()


def test_echo_output_not_produced_is_400(http_client):
    out = [httpclient.InferRequestedOutput("y")]
    e = fails(http_client.infer, "echo", [make_input("x", F32, "FP32")], outputs=out)
    assert e.status() == "400"
    assert "'y'" in e.message()


def test_non_utf8_bytes_as_json_output_is_400(http_client):
    array = np.array([b"\xff"], dtype=object)
    e = fails(echo, http_client, array, "BYTES", True, False)
    assert e.status() == "400"
    assert "binary" in e.message()


def test_model_that_raises_is_500_and_server_stays_up(http_client):
    for _ in range(3):
        e = fails(http_client.infer, "raises", [make_input("x", F32, "FP32")])
        assert e.status() == "500"
        assert "this model always fails" in e.message()
    assert http_client.is_server_live()
    assert http_client.is_model_ready("raises")
    assert_same_tensor(echo(http_client, F32, "FP32", True, True).as_numpy("x"), F32, "FP32")


def test_bytes_json_output_is_str_per_element(http_client):
    array = JSON_SAFE["BYTES"]
    result = echo(http_client, array, "BYTES", False, False)
    assert result.get_output("x")["data"] == [b.decode() for b in as_bytes_list(array)]
