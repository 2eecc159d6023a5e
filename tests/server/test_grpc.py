"""The gRPC front over a real socket with meshserve's own stubs: codes, streaming, repository."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from meshserve.protocol.grpc import grpc_service_pb2 as pb
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc
from meshserve.protocol.grpc.codec import decode_parameters, encode_infer_request
from meshserve.protocol.types import InferenceRequest, Tensor, Uint64


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _req(model: str, *arrays: np.ndarray, names=None, **kw) -> pb.ModelInferRequest:
    names = names or [f"in{i}" for i in range(len(arrays))]
    return encode_infer_request(
        InferenceRequest(model, [Tensor.from_numpy(n, a) for n, a in zip(names, arrays, strict=True)], **kw)
    )


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_health_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="typed", version="1")).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "model_repository" in meta.extensions
    typed = stub.ModelMetadata(pb.ModelMetadataRequest(name="typed"))
    assert list(typed.versions) == ["1"] and list(typed.inputs[0].shape) == [-1, 3]


def test_infer_raw_and_typed_contents(stub):
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    raw = stub.ModelInfer(_req("echo", a, id="r1"))
    assert raw.id == "r1" and raw.raw_output_contents[0] == a.tobytes()
    typed = stub.ModelInfer(encode_infer_request(InferenceRequest("echo", [Tensor.from_numpy("x", a)]), raw=False))
    assert not typed.raw_output_contents and list(typed.outputs[0].contents.int_contents) == a.reshape(-1).tolist()


def test_parameters_round_trip(stub):
    params = {"i": -1, "u": Uint64(2**63 + 5), "d": 1.5, "b": False, "s": "x"}
    resp = stub.ModelInfer(_req("echo", np.ones(1), parameters=params))
    assert resp.model_name == "echo"
    assert stub.ModelInfer(_req("typed", np.ones((1, 3), np.float32), np.ones((1, 3), np.float32),
                                names=["INPUT0", "INPUT1"], parameters=params)).outputs  # fmt: skip
    assert (
        decode_parameters(
            pb.ModelInferRequest(parameters=_req("echo", np.ones(1), parameters=params).parameters).parameters
        )
        == params
    )


@pytest.mark.parametrize(
    "request_,code,text",
    [
        (lambda: _req("nope", np.ones(1)), grpc.StatusCode.NOT_FOUND, "not found"),
        (lambda: _req("typed", np.ones(1), model_version="7"), grpc.StatusCode.NOT_FOUND, "no version"),
        (lambda: _req("typed", np.ones((1, 3)), np.ones((1, 3)), names=["INPUT0", "INPUT1"]),
         grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
        (lambda: _req("raises", np.ones(1)), grpc.StatusCode.INTERNAL, "always fails"),
        (lambda: pb.ModelInferRequest(model_name="echo"), grpc.StatusCode.INVALID_ARGUMENT, "at least one input"),
    ],
)  # fmt: skip
def test_error_codes(stub, request_, code, text):
    got, details = _code(lambda: stub.ModelInfer(request_()))
    assert got == code and text in details


def test_unknown_model_metadata_and_ready(stub):
    assert _code(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: stub.ModelReady(pb.ModelReadyRequest(name="nope")))[0] == grpc.StatusCode.NOT_FOUND


def test_oversized_message_is_refused(tmp_path, model_dir):
    from tests.support.server import start_server

    srv = start_server(model_dir, tmp_path / "log", "--max-request-bytes", "65536")
    try:
        with grpc.insecure_channel(srv.grpc_address) as ch:
            s = pb_grpc.GRPCInferenceServiceStub(ch)
            got, _ = _code(lambda: s.ModelInfer(_req("echo", np.ones(100_000, np.float32))))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert s.ModelInfer(_req("echo", np.ones(10, np.float32))).outputs
    finally:
        srv.stop()


def test_stream_infer_keeps_order_and_survives_errors(stub):
    requests = [_req("echo", np.full(3, i, np.float32), id=str(i)) for i in range(40)]
    requests[17] = _req("nope", np.ones(1), id="17")
    responses = list(stub.ModelStreamInfer(iter(requests)))
    assert len(responses) == 40
    for i, r in enumerate(responses):
        if i == 17:
            assert "not found" in r.error_message
            continue
        assert r.infer_response.id == str(i)
        assert np.frombuffer(r.infer_response.raw_output_contents[0], np.float32).tolist() == [i] * 3


def test_repository(stub, model_dir):
    names = {m.name: m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert names["echo"] == "READY"
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="hooks"))
    assert not stub.ModelReady(pb.ModelReadyRequest(name="hooks")).ready
    got, details = _code(lambda: stub.ModelInfer(_req("hooks", np.ones(2))))
    assert got == grpc.StatusCode.UNAVAILABLE and "not ready" in details
    ready = {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models}
    assert "hooks" not in ready and "echo" in ready
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="hooks"))
    assert stub.ModelReady(pb.ModelReadyRequest(name="hooks")).ready
    assert (
        _code(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope")))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    bad = pb.RepositoryModelLoadRequest(model_name="grpc_echo")
    bad.parameters["config"].string_param = '{"implementation": "model.py:Nope", "uri": "%s"}' % (model_dir / "echo")
    got, details = _code(lambda: stub.RepositoryModelLoad(bad))
    assert got == grpc.StatusCode.INTERNAL and "Nope" in details
    good = pb.RepositoryModelLoadRequest(model_name="grpc_echo")
    good.parameters["config"].string_param = '{"implementation": "model.py:EchoModel", "uri": "%s"}' % (
        model_dir / "echo"
    )
    stub.RepositoryModelLoad(good)
    assert stub.ModelInfer(_req("grpc_echo", np.ones(2))).outputs
    notjson = pb.RepositoryModelLoadRequest(model_name="grpc_echo")
    notjson.parameters["config"].string_param = "{oops"
    assert _code(lambda: stub.RepositoryModelLoad(notjson))[0] == grpc.StatusCode.INVALID_ARGUMENT
