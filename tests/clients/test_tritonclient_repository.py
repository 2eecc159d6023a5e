"""The model repository extension through tritonclient.http and tritonclient.grpc:
index, load, unload, load with a settings document (``config``), and failed loads
that must leave the models already serving alone.

These tests load, unload and break models, so they use a meshserve of their own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.clients.cases import http_address

STATUS = {
    "http": {400: "400", 404: "404", 500: "500", 503: "503"},
    "grpc": {
        400: "StatusCode.INVALID_ARGUMENT",
        404: "StatusCode.NOT_FOUND",
        500: "StatusCode.INTERNAL",
        503: "StatusCode.UNAVAILABLE",
    },
}
SERVED = ["echo", "hooks", "iris", "raises", "typed"]


class Repo:
    """The same repository calls over either protocol."""

    def __init__(self, protocol: str, private) -> None:
        self.protocol = protocol
        self.model_dir = private.model_dir
        if protocol == "http":
            self.mod = httpclient
            self.client = httpclient.InferenceServerClient(http_address(private.server), network_timeout=60)
        else:
            self.mod = grpcclient
            self.client = grpcclient.InferenceServerClient(private.server.grpc_address)

    def status(self, http_status: int) -> str:
        return STATUS[self.protocol][http_status]

    def index(self) -> dict[str, dict]:
        if self.protocol == "http":
            rows = self.client.get_model_repository_index()
        else:
            rows = self.client.get_model_repository_index(as_json=True).get("models", [])
        return {r["name"]: r for r in rows}

    def echo(self, model: str, array: np.ndarray) -> np.ndarray:
        inp = self.mod.InferInput("x", list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        return self.client.infer(model, [inp]).as_numpy("x")

    def hooks(self, array: np.ndarray) -> np.ndarray:
        inp = self.mod.InferInput("v", list(array.shape), "FP32")
        inp.set_data_from_numpy(array)
        return self.client.infer("hooks", [inp]).as_numpy("scaled")

    def fails(self, call, *args, **kwargs) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            call(*args, **kwargs)
        return info.value

    def assert_still_serving(self) -> None:
        """Every model the server started with is ready and echo answers."""
        for name in SERVED:
            assert self.client.is_model_ready(name), name
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(self.echo("echo", x), x)


@pytest.fixture(params=["http", "grpc"])
def repo(request, private_server):
    r = Repo(request.param, private_server)
    yield r
    r.client.close()


def echo_config(name: str, model_dir, implementation: str = "model.py:EchoModel") -> str:
    return json.dumps({"name": name, "implementation": implementation, "uri": str(model_dir / "echo")})


X = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)


def test_index_lists_every_model(repo):
    index = repo.index()
    assert set(SERVED) <= set(index)
    assert all(index[n]["state"] == "READY" for n in SERVED)
    assert index["typed"]["version"] == "1"


def test_unload_then_load(repo):
    repo.client.unload_model("hooks")
    try:
        assert not repo.client.is_model_ready("hooks")
        assert repo.index()["hooks"]["state"] != "READY"
        e = repo.fails(repo.hooks, X)
        assert e.status() == repo.status(503)
        assert "hooks" in e.message()
        # unloading one model leaves the others serving
        for name in ("echo", "iris", "typed"):
            assert repo.client.is_model_ready(name)
        repo.client.unload_model("hooks")  # a second unload is harmless
    finally:
        repo.client.load_model("hooks")
    assert repo.client.is_model_ready("hooks")
    assert repo.index()["hooks"]["state"] == "READY"
    np.testing.assert_allclose(repo.hooks(X), X * 2.5)


def test_load_ready_model_again(repo):
    repo.client.load_model("echo")
    repo.assert_still_serving()


def test_load_new_model_from_config(repo):
    name = f"echo2_{repo.protocol}"
    assert name not in repo.index()
    repo.client.load_model(name, config=echo_config(name, repo.model_dir))
    assert repo.client.is_model_ready(name)
    assert repo.index()[name]["state"] == "READY"
    np.testing.assert_array_equal(repo.echo(name, X), X)
    repo.client.unload_model(name)
    assert not repo.client.is_model_ready(name)
    assert repo.fails(repo.echo, name, X).status() == repo.status(503)
    repo.client.load_model(name)  # loaded again from the config it was registered with
    np.testing.assert_array_equal(repo.echo(name, X), X)
    repo.assert_still_serving()


def test_model_name_with_dots_and_dashes(repo):
    name = f"echo.v2-{repo.protocol}_x"
    repo.client.load_model(name, config=echo_config(name, repo.model_dir))
    assert repo.client.is_model_ready(name)
    np.testing.assert_array_equal(repo.echo(name, X), X)
    assert repo.index()[name]["state"] == "READY"


def test_new_model_with_missing_implementation_fails_and_disturbs_nothing(repo):
    name = f"broken_{repo.protocol}"
    e = repo.fails(repo.client.load_model, name, config=echo_config(name, repo.model_dir, "model.py:NoSuchClass"))
    assert e.status() == repo.status(500)
    assert name in e.message()
    assert not repo.client.is_model_ready(name)
    assert repo.index()[name]["state"] != "READY"
    assert repo.fails(repo.echo, name, X).status() == repo.status(503)
    repo.assert_still_serving()
    # a good config for the same name repairs it
    repo.client.load_model(name, config=echo_config(name, repo.model_dir))
    np.testing.assert_array_equal(repo.echo(name, X), X)


def test_failed_reload_keeps_the_loaded_copy(repo):
    config = json.dumps({"name": "echo", "implementation": "model.py:NoSuchClass"})
    e = repo.fails(repo.client.load_model, "echo", config=config)
    assert e.status() == repo.status(500)
    assert "echo" in e.message()
    assert repo.index()["echo"]["state"] == "READY"
    repo.assert_still_serving()


def test_reload_with_config_then_from_files(repo):
    """A config reloads a serving model with new settings; a plain load rereads its files."""
    config = json.dumps({"name": "hooks", "implementation": "model.py:Scaled", "parameters": {"factor": 4.0}})
    repo.client.load_model("hooks", config=config)
    try:
        np.testing.assert_allclose(repo.hooks(X), X * 4.0)
    finally:
        repo.client.load_model("hooks")
    np.testing.assert_allclose(repo.hooks(X), X * 2.5)


def test_config_with_a_missing_uri_path_fails(repo):
    name = f"nowhere_{repo.protocol}"
    config = json.dumps({"name": name, "implementation": "model.py:EchoModel", "uri": "no_such_dir"})
    e = repo.fails(repo.client.load_model, name, config=config)
    assert e.status() == repo.status(500)
    repo.assert_still_serving()


@pytest.mark.parametrize("call", ["load_model", "unload_model"])
def test_unknown_model_is_not_found(repo, call):
    e = repo.fails(getattr(repo.client, call), "no-such-model")
    assert e.status() == repo.status(404)
    assert "no-such-model" in e.message()


@pytest.mark.parametrize(
    "config,words",
    [
        ('{"name": "someone-else", "implementation": "model.py:EchoModel"}', "someone-else"),
        ("{not json", "JSON"),
        ('["a", "list"]', "object"),
        ('{"implementation": "model.py:EchoModel"}', "uri"),
        ('{"implementation": "model.py:EchoModel", "uri": "/tmp", "no_such_field": 1}', "no_such_field"),
    ],
    ids=["other-name", "not-json", "not-object", "new-without-uri", "unknown-field"],
)
def test_bad_config_is_invalid_argument(repo, config, words):
    name = f"fresh_{repo.protocol}"
    e = repo.fails(repo.client.load_model, name, config=config)
    assert e.status() == repo.status(400)
    assert words in e.message()
    assert name not in repo.index()
    repo.assert_still_serving()


def test_folder_added_after_start_loads_by_name(repo):
    """Triton's explicit mode: copy a model folder into the repository, then load it by name."""
    name = f"copied_{repo.protocol}"
    shutil.copytree(repo.model_dir / "echo", repo.model_dir / name)
    (repo.model_dir / name / "model-settings.json").write_text(
        json.dumps({"name": name, "implementation": "model.py:EchoModel"})
    )
    row = repo.index()[name]
    assert row["state"] == "UNAVAILABLE"
    assert "load" in row["reason"]
    repo.client.load_model(name)
    assert repo.client.is_model_ready(name)
    assert repo.index()[name]["state"] == "READY"
    np.testing.assert_array_equal(repo.echo(name, X), X)
    repo.client.unload_model(name)
    assert not repo.client.is_model_ready(name)
    repo.client.load_model(name)
    np.testing.assert_array_equal(repo.echo(name, X), X)
    repo.assert_still_serving()
