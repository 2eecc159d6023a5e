"""A modelcar served end to end: push with the CLI, pre-fetch with `meshserve pull`,
serve from the registry, restart with the registry down."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx

from tests.support.server import EXAMPLES, ensure_iris, meshserve_command, start_server

IRIS = {"inputs": [{"name": "input0", "shape": [1, 4], "datatype": "FP32", "data": [[6.7, 3.0, 5.2, 2.3]]}]}


def test_modelcar_cli_then_serve_then_serve_offline(private_registry, tmp_path):
    ensure_iris()
    src = tmp_path / "iris"
    shutil.copytree(EXAMPLES / "iris", src, ignore=shutil.ignore_patterns("train.py", "__pycache__"))
    uri = f"oci://{private_registry.host}/models/iris:1.0"
    env = {"MESHSERVE_CACHE_DIR": str(tmp_path / "cache"), "MESHSERVE_INSECURE_REGISTRIES": "true"}
    built = subprocess.run(
        [*meshserve_command(), "modelcar", "build", str(src), "--tag", uri, "--insecure"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "MiB/s" in built.stderr and built.stdout.strip().startswith(uri + "@sha256:")
    pulled = subprocess.run(
        [*meshserve_command(), "pull", uri, "--insecure", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "cache" / "content") in [p.parent for p in [__import__("pathlib").Path(pulled.stdout.strip())]]

    config = tmp_path / "meshserve.json"
    config.write_text(json.dumps({"models": [{"name": "iris", "uri": uri}]}))
    for attempt in ("online", "offline"):
        if attempt == "offline":
            private_registry.stop()
        srv = start_server(None, tmp_path / f"{attempt}.log", "--config", str(config), env=env)
        try:
            r = httpx.post(f"{srv.http_url}/v2/models/iris/infer", json=IRIS, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == [2]
            meta = httpx.get(f"{srv.http_url}/v2/models/iris").json()
            assert meta["inputs"][0]["shape"] == [-1, 4]  # the settings file shipped in the modelcar
        finally:
            srv.stop()


def test_bad_uris_fail_the_model_not_the_server(registry, tmp_path):
    env = {"MESHSERVE_CACHE_DIR": str(tmp_path / "cache"), "MESHSERVE_INSECURE_REGISTRIES": "true",
           "MESHSERVE_AUTH_TOKEN": "operator-token"}  # fmt: skip
    srv = start_server(EXAMPLES, tmp_path / "log", "--repository-uris", "any", env=env)
    auth = {"authorization": "Bearer operator-token"}
    try:
        for name, uri, status, reason in [
            ("ghost", f"oci://{registry.host}/no/such:1", 500, "not found"),
            ("nohost", "oci://127.0.0.1:1/x/y:1", 500, "unreachable"),
            ("weird", "ftp://example/x", 400, "not supported"),  # the client's mistake, before any fetch
        ]:
            config = {"implementation": "model.py:EchoModel", "uri": uri}
            r = httpx.post(f"{srv.http_url}/v2/repository/models/{name}/load", json={"parameters": {"config": config}},
                           headers=auth)  # fmt: skip
            assert r.status_code == status and reason in r.json()["error"] and uri.split("//")[1] in r.json()["error"]
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
        assert httpx.post(f"{srv.http_url}/v2/models/echo/infer", json=doc, headers=auth).status_code == 200
        assert httpx.get(f"{srv.http_url}/v2/health/ready").status_code == 200
    finally:
        srv.stop()
