"""tritonclient.grpc against a real meshserve: health, metadata, every datatype (raw
contents as tritonclient sends them, and typed contents through tritonclient's own
stubs), the example and test models, error codes, and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import joblib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.clients.cases import (
    BINARY_ONLY,
    DATATYPES,
    JSON_SAFE,
    SHAPES,
    as_bytes_list,
    assert_same_tensor,
    distinct_payload,
    sample,
)

N = 200


def make_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def echo(client, array: np.ndarray, datatype: str, name: str = "x", **kwargs):
    return client.infer("echo", [make_input(name, array, datatype)], **kwargs)


def fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


# -- health and metadata -------------------------------------------------------------


def test_health(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()


@pytest.mark.parametrize("model,version", [("echo", ""), ("iris", ""), ("typed", ""), ("typed", "1"), ("hooks", "")])
def test_model_ready(grpc_client, model, version):
    assert grpc_client.is_model_ready(model, version)


@pytest.mark.parametrize("model,version", [("no-such-model", ""), ("typed", "2")])
def test_model_ready_of_unknown_model_is_not_found(grpc_client, model, version):
    e = fails(grpc_client.is_model_ready, model, version)
    assert e.status() == "StatusCode.NOT_FOUND"


def test_server_metadata(grpc_client):
    meta = grpc_client.get_server_metadata()
    assert meta.name == "meshserve"
    assert meta.version
    assert {"binary_tensor_data", "model_repository"} <= set(meta.extensions)
    assert grpc_client.get_server_metadata(as_json=True)["name"] == "meshserve"


def test_iris_metadata(grpc_client):
    meta = grpc_client.get_model_metadata("iris")
    assert meta.name == "iris"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input0", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("predict", "INT64", [-1]),
        ("predict_proba", "FP64", [-1, 3]),
    ]


@pytest.mark.parametrize("version", ["", "1"])
def test_typed_metadata(grpc_client, version):
    meta = grpc_client.get_model_metadata("typed", version)
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 3]),
        ("INPUT1", "FP32", [-1, 3]),
    ]


@pytest.mark.parametrize("model,version", [("no-such-model", ""), ("typed", "2"), ("echo", "7")])
def test_metadata_of_unknown_model_is_not_found(grpc_client, model, version):
    e = fails(grpc_client.get_model_metadata, model, version)
    assert e.status() == "StatusCode.NOT_FOUND"
    assert repr(model) in e.message()


# -- datatypes through echo (raw contents) -------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_echo_every_datatype(grpc_client, datatype):
    array = JSON_SAFE[datatype]
    result = echo(grpc_client, array, datatype)
    out = result.get_output("x")
    assert out.datatype == datatype
    assert list(out.shape) == list(array.shape)
    assert_same_tensor(result.as_numpy("x"), array, datatype)


@pytest.mark.parametrize("datatype", sorted(BINARY_ONLY))
def test_echo_nan_inf_and_non_utf8(grpc_client, datatype):
    array = BINARY_ONLY[datatype]
    assert_same_tensor(echo(grpc_client, array, datatype).as_numpy("x"), array, datatype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT64", "FP16", "FP64", "BYTES"])
def test_echo_odd_shapes(grpc_client, datatype, shape):
    array = sample(datatype, shape)
    result = echo(grpc_client, array, datatype)
    assert list(result.get_output("x").shape) == list(shape)
    assert_same_tensor(result.as_numpy("x"), array, datatype)


@pytest.mark.parametrize("shape", [(1, 150528), (4, 1 << 20)], ids=["image", "16MiB"])
def test_echo_large_fp32(grpc_client, shape):
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_same_tensor(echo(grpc_client, array, "FP32").as_numpy("x"), array, "FP32")


def test_echo_many_inputs_and_output_order(grpc_client):
    tensors = {
        "a": (np.arange(6, dtype=np.int32).reshape(2, 3), "INT32"),
        "b": (np.array([0.25, -8.5]), "FP64"),
        "c": (np.array([b"one", b"", b"three"], dtype=object), "BYTES"),
        "d": (np.array([[True], [False]]), "BOOL"),
        "e": (np.array(1.5, dtype=np.float16), "FP16"),
    }
    names = ["c", "e", "a"]
    result = grpc_client.infer(
        "echo",
        [make_input(n, a, dt) for n, (a, dt) in tensors.items()],
        outputs=[grpcclient.InferRequestedOutput(n) for n in names],
    )
    assert [o.name for o in result.get_response().outputs] == names
    for n in names:
        assert_same_tensor(result.as_numpy(n), *tensors[n])


def test_compressed_requests(grpc_client):
    array = np.arange(1000, dtype=np.int64)
    for algorithm in ("gzip", "deflate"):
        result = echo(grpc_client, array, "INT64", compression_algorithm=algorithm)
        assert_same_tensor(result.as_numpy("x"), array, "INT64")


# -- typed (non-raw) contents, sent with tritonclient's own stubs ---------------------

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_typed_contents_round_trip(stub, datatype):
    """A client that fills InferTensorContents gets typed contents back, value for value."""
    array = JSON_SAFE[datatype]
    field = CONTENTS_FIELD[datatype]
    request = service_pb2.ModelInferRequest(model_name="echo", id="typed-1")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    values = as_bytes_list(array) if datatype == "BYTES" else array.reshape(-1).tolist()
    getattr(tensor.contents, field).extend(values)
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed-1"
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("x", datatype, list(array.shape))
    if response.raw_output_contents:  # raw answers are allowed too; then they must decode to the values
        assert_same_tensor(grpcclient.InferResult(response).as_numpy("x"), array, datatype)
    else:
        assert list(getattr(out.contents, field)) == values


def test_typed_contents_for_fp16_is_invalid(stub):
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="x", datatype="FP16", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- request id and parameters ---------------------------------------------------------


def test_request_id_is_echoed(grpc_client):
    result = echo(grpc_client, np.zeros(2, np.float32), "FP32", request_id="id-\u00e9-42")
    assert result.get_response().id == "id-\u00e9-42"
    assert result.get_response().model_name == "echo"


@pytest.mark.parametrize(
    "parameters",
    [{"an_int": 7}, {"a_str": "text"}, {"a_bool": True}, {"n": -(2**63), "s": "", "b": False}],
    ids=["int", "str", "bool", "mixed"],
)
def test_request_parameters_are_accepted(grpc_client, parameters):
    array = np.array([3, 4], np.int64)
    assert_same_tensor(echo(grpc_client, array, "INT64", parameters=parameters).as_numpy("x"), array, "INT64")


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
def test_tritonclient_scheduling_arguments_are_accepted(grpc_client, kwargs):
    array = np.array([1.5], np.float32)
    assert_same_tensor(echo(grpc_client, array, "FP32", **kwargs).as_numpy("x"), array, "FP32")


# -- the example and test models ---------------------------------------------------------


def test_iris_predictions(grpc_client, model_dir):
    model = joblib.load(model_dir / "iris" / "model.joblib")
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("predict_proba", "predict")]
    result = grpc_client.infer("iris", [make_input("input0", x, "FP32")], outputs=outputs)
    predict, proba = result.as_numpy("predict"), result.as_numpy("predict_proba")
    assert predict.dtype == np.int64 and predict.shape == (150,)
    assert proba.dtype == np.float64 and proba.shape == (150, 3)
    np.testing.assert_array_equal(predict, np.argmax(proba, axis=1))
    np.testing.assert_array_equal(predict, model.predict(x))
    np.testing.assert_allclose(proba, model.predict_proba(x), rtol=1e-9, atol=1e-12)
    assert (predict == y).mean() > 0.9
    default = grpc_client.infer("iris", [make_input("input0", x[:3], "FP32")])
    assert [o.name for o in default.get_response().outputs] == ["predict"]


@pytest.mark.parametrize("version", ["", "1"])
def test_typed_add_sub(grpc_client, version):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    inputs = [make_input("INPUT0", a, "FP32"), make_input("INPUT1", b, "FP32")]
    result = grpc_client.infer("typed", inputs, model_version=version)
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = grpc_client.infer("typed", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in only.get_response().outputs] == ["OUTPUT1"]


def test_hooks_model(grpc_client):
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    result = grpc_client.infer("hooks", [make_input("x", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("scaled"), x.astype(np.float64) * 2.5)
    np.testing.assert_allclose(result.as_numpy("total"), [x.sum() * 2.5])


# -- errors ---------------------------------------------------------------------------------

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


@pytest.mark.parametrize("tensors,output,words", TYPED_ERRORS)
def test_typed_validation_is_invalid_argument(grpc_client, tensors, output, words):
    inputs = [make_input(n, a, dt) for n, a, dt in tensors]
    outputs = [grpcclient.InferRequestedOutput(output)] if output else None
    e = fails(grpc_client.infer, "typed", inputs, outputs=outputs)
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert words in e.message()


@pytest.mark.parametrize("model,version", [("no-such-model", ""), ("typed", "2"), ("echo", "3")])
def test_infer_unknown_model_is_not_found(grpc_client, model, version):
    e = fails(grpc_client.infer, model, [make_input("x", F32, "FP32")], model_version=version)
    assert e.status() == "StatusCode.NOT_FOUND"
    assert model in e.message()


def test_output_not_produced_is_invalid_argument(grpc_client):
    e = fails(grpc_client.infer, "echo", [make_input("x", F32, "FP32")], outputs=[grpcclient.InferRequestedOutput("y")])
    assert e.status() == "StatusCode.INVALID_ARGUMENT"


def test_model_that_raises_is_internal_and_server_stays_up(grpc_client):
    for _ in range(3):
        e = fails(grpc_client.infer, "raises", [make_input("x", F32, "FP32")])
        assert e.status() == "StatusCode.INTERNAL"
        assert "this model always fails" in e.message()
    assert grpc_client.is_server_live()
    assert_same_tensor(echo(grpc_client, F32, "FP32").as_numpy("x"), F32, "FP32")


# -- concurrency ------------------------------------------------------------------------------


def request_for(i: int) -> list[grpcclient.InferInput]:
    ints, tag = distinct_payload(i)
    return [make_input("ints", ints, "INT32"), make_input("tag", tag, "BYTES")]


def check_answer(result, i: int) -> None:
    ints, tag = distinct_payload(i)
    assert result.get_response().id == f"r{i}"
    np.testing.assert_array_equal(result.as_numpy("ints"), ints)
    assert as_bytes_list(result.as_numpy("tag")) == as_bytes_list(tag)


def test_async_infer_200_concurrent(grpc_client):
    answers: dict[int, tuple] = {}
    lock = threading.Lock()
    done = threading.Event()

    def callback(i, result, error):
        with lock:
            answers[i] = (result, error)
            if len(answers) == N:
                done.set()

    for i in range(N):
        grpc_client.async_infer("echo", request_for(i), partial(callback, i), request_id=f"r{i}")
    assert done.wait(60), f"only {len(answers)} of {N} callbacks arrived"
    for i, (result, error) in answers.items():
        assert error is None, error
        check_answer(result, i)


def test_200_concurrent_from_threads_sharing_a_client(grpc_client):
    def one(i: int):
        return grpc_client.infer("echo", request_for(i), request_id=f"r{i}")

    with ThreadPoolExecutor(32) as pool:
        for i, result in enumerate(pool.map(one, range(N))):
            check_answer(result, i)
