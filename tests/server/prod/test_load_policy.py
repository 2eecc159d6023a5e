"""Secure by default: a client of a server started with default flags cannot make it run
code or read files outside --model-dir through the repository API (docs/operations/security.md).

Each exploit here worked on the server before the load policy: the attacker's file
writes a marker when imported, so "refused" also means "never ran".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from tests.server.prod.conftest import grpc_stub, infer_doc
from tests.support.server import RunningServer, meshserve_command, start_server

TOKEN = "operator-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from meshserve import Model
class X(Model):
    def predict(self, request):
        return {{}}
"""


@pytest.fixture(scope="module")
def attacker(tmp_path_factory) -> Path:
    """Files an attacker managed to put outside the model directory (e.g. /tmp uploads)."""
    d = tmp_path_factory.mktemp("attacker")
    (d / "evil.py").write_text(EVIL.format(marker=str(d / "ran")))
    (d / "model").mkdir()
    (d / "model" / "model.py").write_text(EVIL.format(marker=str(d / "ran")))
    (d / "secret.txt").write_text("s3cr3t-contents")
    return d


@pytest.fixture(scope="module")
def models(prod_models, attacker) -> Path:
    # A model folder holding a symlink to the attacker's file: resolved, it is outside.
    (prod_models / "slow" / "linked.py").unlink(missing_ok=True)
    (prod_models / "slow" / "linked.py").symlink_to(attacker / "evil.py")
    return prod_models


@pytest.fixture(scope="module")
def srv(models, tmp_path_factory):
    s = start_server(models, tmp_path_factory.mktemp("policy") / "server.log")
    yield s
    s.stop()


def _load(srv: RunningServer, name: str, config: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{srv.http_url}/v2/repository/models/{name}/load",
                      json={"parameters": {"config": config}}, headers=headers, timeout=30)  # fmt: skip


def _exploits(attacker: Path) -> list[tuple[str, dict]]:
    evil = attacker / "evil.py"
    return [
        ("uri outside", {"uri": str(attacker / "model"), "implementation": "model.py:X"}),
        ("file uri outside", {"uri": f"file://{attacker / 'model'}", "implementation": "model.py:X"}),
        ("http uri", {"uri": "http://127.0.0.1:1/model.tar.gz", "implementation": "model.py:X"}),
        ("absolute implementation", {"implementation": f"{evil}:X"}),
        ("dotdot implementation", {"implementation": f"../../../../../../../..{evil}:X"}),
        ("symlinked implementation", {"implementation": "linked.py:X"}),
        ("module implementation", {"implementation": "os:system"}),
        ("dotted implementation", {"implementation": "tests.server.prod.conftest.Slow"}),
        ("runtime file", {"runtime": f"{evil}:X"}),
        ("runtime module", {"runtime": "os.path:join"}),
        ("absolute parameters.file", {"runtime": "sklearn", "parameters": {"file": str(attacker / "secret.txt")}}),
        ("dotdot parameters.file", {"runtime": "sklearn", "parameters": {"file": "../../secret.txt"}}),
        ("trust_remote_code", {"runtime": "llm", "parameters": {"trust_remote_code": True}}),
        ("vllm_args", {"runtime": "llm", "parameters": {"vllm_args": {"tokenizer": "/etc"}}}),
    ]


def test_default_flags_refuse_every_code_or_path_field(srv, attacker):
    for what, config in _exploits(attacker):
        r = _load(srv, "slow", config)
        assert r.status_code == 403, (what, r.text)
        error = r.json()["error"]
        assert "--repository" in error or "copy the file" in error, (what, error)  # says what would allow it
        assert "secret" not in error and str(attacker) not in error, (what, error)  # no echo of paths
    assert not (attacker / "ran").exists()
    # What was serving still serves, and a load inside the model's own folder still works.
    assert httpx.post(f"{srv.http_url}/v2/models/slow/infer", json=infer_doc([1])).status_code == 200
    r = _load(srv, "slow", {"implementation": "model.py:Slow"})
    assert r.status_code == 200, r.text
    r = _load(srv, "slow2", {"uri": "slow", "implementation": "model.py:Slow"})
    assert r.status_code == 200, r.text
    assert httpx.post(f"{srv.http_url}/v2/models/slow2/infer", json=infer_doc([3])).json()["outputs"][0]["data"] == [6]


def test_no_file_existence_oracle(srv, attacker):
    """An existing and a missing file outside the folder get the same answer."""
    answers = set()
    for target in (attacker / "secret.txt", attacker / "no-such-file.txt"):
        r = _load(srv, "slow", {"runtime": "sklearn", "parameters": {"file": str(target)}})
        answers.add((r.status_code, r.json()["error"]))
    assert len(answers) == 1


def test_grpc_refusals_are_permission_denied(srv, attacker):
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    with grpc.insecure_channel(srv.grpc_address) as channel:
        req = pb.RepositoryModelLoadRequest(model_name="slow")
        req.parameters["config"].string_param = f'{{"implementation": "{attacker / "evil.py"}:X"}}'
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(channel).RepositoryModelLoad(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--repository-code" in e.value.details()
    assert not (attacker / "ran").exists()


@pytest.mark.parametrize(
    "flags,env,words",
    [
        (["--adapters"], {}, "--adapters"),
        (["--repository-uris", "any"], {}, "--repository-uris any"),
        (["--repository-code"], {}, "--repository-code"),
        ([], {"MESHSERVE_ADAPTERS": "true"}, "--adapters"),
    ],
    ids=["adapters", "uris-any", "code", "adapters-env"],
)
def test_code_running_settings_need_a_token_to_start(tmp_path, flags, env, words):
    import os

    cmd = [*meshserve_command(), "serve", "--model-dir", str(tmp_path), "--http-port", "0", "--grpc-port", "0", *flags]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert out.returncode == 2, out.stderr
    assert "refusing to start" in out.stderr and words in out.stderr and "auth token" in out.stderr
    assert "Traceback" not in out.stderr


def test_programmatic_serve_refuses_too(tmp_path):
    code = ("from meshserve import Settings, serve\n"
            f"serve(Settings(model_dir={str(tmp_path)!r}, adapters=True, http_port=0, grpc_port=0))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "auth token" in out.stderr


def test_an_authenticated_operator_may_widen_the_policy(models, attacker, tmp_path):
    srv = start_server(models, tmp_path / "log", "--repository-uris", "any", "--repository-code",
                       env={"MESHSERVE_AUTH_TOKEN": TOKEN})  # fmt: skip
    try:
        # Without the token nothing is reachable; with it, the operator's explicit choice holds.
        outside = {"uri": str(attacker / "model"), "implementation": "model.py:X"}
        assert _load(srv, "outside", outside).status_code == 401
        r = _load(srv, "outside", outside, AUTH)
        assert r.status_code == 200, r.text
        assert (attacker / "ran").read_text() == "ran"
        r = _load(srv, "bymodule", {"uri": "slow", "implementation": "tests.server.prod.conftest:NoSuchClass"}, AUTH)
        assert r.status_code == 500 and "NoSuchClass" in r.json()["error"]  # imported, not refused
    finally:
        srv.stop()
        (attacker / "ran").unlink(missing_ok=True)
