"""tritonclient (gRPC and HTTP) plain infer against an LLM model: a BYTES prompt in,
``text_output`` out, sampling settings as request parameters, errors as status codes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.clients.cases import http_address
from tests.support.server import RunningServer, start_server


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    pytest.importorskip("transformers")
    from tests.server.llm.tiny_llama import build

    models = tmp_path_factory.mktemp("llm-models")
    build(models / "llama2")
    srv = start_server(models, tmp_path_factory.mktemp("llm-log") / "server.log")
    yield srv
    srv.stop()


def prompt_input(module, texts: list[str], name: str = "text_input"):
    inp = module.InferInput(name, [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return inp


def test_grpc_infer_generates_text(llm_server):
    client = grpcclient.InferenceServerClient(llm_server.grpc_address)
    try:
        params = {"max_tokens": 6, "temperature": 0}
        first = client.infer("llama2", [prompt_input(grpcclient, ["Where is Eiffel Tower?", "Hi"])], parameters=params)
        again = client.infer("llama2", [prompt_input(grpcclient, ["Where is Eiffel Tower?", "Hi"])], parameters=params)
        out = first.as_numpy("text_output")
        assert out.shape == (2,) and all(isinstance(x, bytes) and x for x in out)
        assert list(out) == list(again.as_numpy("text_output"))  # greedy: deterministic
        meta = client.get_model_metadata("llama2", as_json=True)
        assert meta["inputs"][0]["name"] == "text_input"
        # The seed's input name works over gRPC too.
        alias = client.infer(
            "llama2", [prompt_input(grpcclient, ["Where is Eiffel Tower?"], "input0")], parameters=params
        )
        assert alias.as_numpy("text_output")[0] == out[0]
    finally:
        client.close()


def test_grpc_bad_parameter_is_invalid_argument(llm_server):
    client = grpcclient.InferenceServerClient(llm_server.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("llama2", [prompt_input(grpcclient, ["Hi"])], parameters={"max_tokens": 0})
        assert "INVALID_ARGUMENT" in str(err.value.status()) and "max_tokens" in err.value.message()
    finally:
        client.close()


def test_http_infer_generates_text(llm_server):
    client = httpclient.InferenceServerClient(http_address(llm_server), network_timeout=60)
    try:
        res = client.infer("llama2", [prompt_input(httpclient, ["Where is Eiffel Tower?"], "input0")])
        assert res.as_numpy("text_output").shape == (1,)
    finally:
        client.close()
