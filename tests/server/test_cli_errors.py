"""Errors where a person types: ``meshserve serve/pull/modelcar/generate`` fail in one line
with what to do and exit code 2 (a traceback only with ``--debug``); a URI no loader takes
is a 400 naming the forms that work; ``--model-dir`` at one model's folder says what to pass;
the documented ``--insecure`` and ``--s3-endpoint`` reach the fetcher of serve and pull."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.server import EXAMPLES, REPO, ensure_iris, meshserve_command, start_server

AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}


def meshserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [*meshserve_command(), *args], capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def plain_http() -> Iterator[int]:
    """A plain-http server that answers 404 to everything: a registry/S3 stand-in that is not TLS."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize(
    "uri,words",
    [
        ("gs://bucket/model", ["'gs'", "oci://registry/repository:tag", "s3://", "http(s)://"]),
        ("hf://org/model", ["'hf'", "huggingface-cli download"]),
        ("ftp://host/model", ["'ftp'", "oci://registry/repository:tag"]),
    ],
)
def test_pull_of_an_unsupported_scheme_names_the_supported_ones(uri, words):
    line = one_line_error(meshserve("pull", uri, "--quiet"))
    assert line.startswith("meshserve pull: ")
    assert all(w in line for w in words), line


def test_pull_of_an_image_without_its_scheme_suggests_oci():
    line = one_line_error(meshserve("pull", "localhost:5000/models/iris:1", "--quiet"))
    assert "oci://localhost:5000/models/iris:1" in line


def test_modelcar_tag_takes_the_form_pull_takes():
    ensure_iris()
    line = one_line_error(
        meshserve("modelcar", "build", str(EXAMPLES / "iris"), "--tag", "localhost:5000/models/iris:1", "--quiet")
    )
    assert "oci://localhost:5000/models/iris:1" in line


@pytest.mark.parametrize(
    "args,words",
    [
        (["pull", "/no/such/model/dir", "--quiet"], ["/no/such/model/dir", "does not exist"]),
        (["pull", "oci://127.0.0.1:1/m:1", "--quiet"], ["127.0.0.1:1", "unreachable"]),
        (["modelcar", "build", "/no/such/dir", "--tag", "oci://127.0.0.1:1/m:1", "--quiet"], ["/no/such/dir"]),
        (["generate", "--model", "/no/such/model", "--input", "/no/such.jsonl", "--output", "/tmp/x"], ["input"]),
    ],
    ids=["missing-path", "no-registry", "missing-build-dir", "missing-input"],
)
def test_command_errors_are_one_line_with_exit_code_2(args, words):
    line = one_line_error(meshserve(*args))
    assert line.startswith(f"meshserve {args[0]}: "), line
    assert all(w in line for w in words), line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(where):
    args = ["pull", "gs://bucket/model", "--quiet"]
    out = meshserve("--debug", *args) if where == "before" else meshserve(*args, "--debug")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "UnsupportedURI" in out.stderr


def test_serve_settings_errors_are_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("http_port: -5\ncapacity_wait_seconds: soon\n")
    line = one_line_error(meshserve("serve", "--config", str(config)))
    assert "invalid settings" in line and "http_port" in line and "capacity_wait_seconds" in line


def test_pull_s3_endpoint_flag_reaches_the_fetcher(plain_http):
    out = meshserve("pull", "s3://bucket/model", "--s3-endpoint", f"http://127.0.0.1:{plain_http}", "--quiet", env=AWS)
    line = one_line_error(out)
    assert "404" in line and "ListObjects" in line, line  # it asked our endpoint, not AWS


def test_pull_insecure_flag_uses_plain_http(plain_http):
    uri = f"oci://127.0.0.1:{plain_http}/models/m:1"
    assert "not found" in one_line_error(meshserve("pull", uri, "--insecure", "--quiet"))
    secure = one_line_error(meshserve("pull", uri, "--quiet"))
    assert "--insecure" in secure  # TLS to a plain-http server: the hint names the flag


def test_serve_insecure_and_s3_endpoint_flags(tmp_path, plain_http):
    pytest.importorskip("boto3")
    config = tmp_path / "models.json"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {"name": "from_oci", "uri": f"oci://127.0.0.1:{plain_http}/models/m:1"},
                    {"name": "from_s3", "uri": "s3://bucket/model"},
                ]
            }
        )
    )
    args = ["--config", str(config), "--insecure", "--s3-endpoint", f"http://127.0.0.1:{plain_http}"]
    env = {**AWS, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    srv = start_server(None, tmp_path / "server.log", *args, env=env, wait_ready=False)  # both loads fail
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = {r["name"]: r for r in httpx.post(f"{srv.http_url}/v2/repository/index", json={}).json()}
            if all(r["state"] == "FAILED" for r in rows.values()):
                break
            time.sleep(0.1)
    finally:
        srv.stop()
    assert rows["from_oci"]["state"] == "FAILED"
    assert "not found" in rows["from_oci"]["reason"] and "SSL" not in rows["from_oci"]["reason"]
    assert rows["from_s3"]["state"] == "FAILED"
    assert "404" in rows["from_s3"]["reason"], rows["from_s3"]["reason"]


def test_model_dir_at_one_models_folder_warns_what_to_pass(tmp_path):
    ensure_iris()
    iris = shutil.copytree(EXAMPLES / "iris", tmp_path / "models" / "iris")
    srv = start_server(iris, tmp_path / "server.log")
    try:
        index = httpx.post(f"{srv.http_url}/v2/repository/index", json={}).json()
    finally:
        srv.stop()
    log = srv.log()
    assert f"--model-dir {tmp_path / 'models'}" in log, log
    assert "one model's folder" in log and "'iris'" in log
    assert index == []


def test_model_dir_of_model_folders_does_not_warn(tmp_path):
    shutil.copytree(EXAMPLES / "echo", tmp_path / "models" / "echo")
    srv = start_server(tmp_path / "models", tmp_path / "server.log")
    srv.stop()
    assert "one model's folder" not in srv.log()


@pytest.mark.parametrize(
    "uri,words",
    [
        ("gs://bucket/model", ["'gs'", "oci://"]),
        ("hf://org/model", ["'hf'", "huggingface-cli"]),
        ("localhost:5000/models/iris:1", ["oci://localhost:5000/models/iris:1"]),
    ],
)
def test_api_load_of_an_unsupported_uri_is_400(server, uri, words):
    """Before the load policy and any fetch: the scheme is the client's mistake (never 500)."""
    config = {"name": "elsewhere", "implementation": "model.py:EchoModel", "uri": uri}
    r = httpx.post(
        f"{server.http_url}/v2/repository/models/elsewhere/load", json={"parameters": {"config": config}}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert all(w in r.json()["error"] for w in words), r.text


def test_grpc_load_of_an_unsupported_uri_is_invalid_argument(server):
    import grpc
    from meshserve.protocol.grpc import grpc_service_pb2 as pb
    from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

    config = json.dumps({"name": "elsewhere", "implementation": "model.py:EchoModel", "uri": "gs://bucket/m"})
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(
            model_name="elsewhere", parameters={"config": pb.ModelRepositoryParameter(string_param=config)}
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'gs'" in info.value.details()


def test_serve_config_with_an_unsupported_uri_stops_in_one_line(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text('models:\n  - {name: remote, uri: "hf://org/model"}\n')
    out = meshserve("serve", "--config", str(config), "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0")
    line = out.stderr.strip().splitlines()[-1]  # after the server's own start line
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert line.startswith("meshserve serve: ") and "'hf'" in line and "huggingface-cli" in line, line
