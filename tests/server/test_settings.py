import json
import subprocess
import sys
import time
import urllib.request

import pytest
from meshserve.server.settings import Settings

from tests.support.server import meshserve_command, start_server


def test_precedence_flags_env_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_port: 1111\ngrpc_port: 2222\nlog_level: debug\n")
    s = Settings.load(cfg)
    assert (s.http_port, s.grpc_port, s.log_level) == (1111, 2222, "debug")
    monkeypatch.setenv("MESHSERVE_HTTP_PORT", "3333")
    s = Settings.load(cfg)
    assert (s.http_port, s.grpc_port) == (3333, 2222)
    s = Settings.load(cfg, http_port=4444, grpc_port=None)
    assert (s.http_port, s.grpc_port) == (4444, 2222)
    monkeypatch.setenv("MESHSERVE_CONFIG", str(cfg))
    assert Settings.load().grpc_port == 2222


def test_invalid_settings_exit_cleanly(tmp_path):
    out = subprocess.run([*meshserve_command(), "serve", "--http-port", "99999"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid settings" in out.stderr and "Traceback" not in out.stderr


def test_config_file_lists_models_and_env_sets_ports(tmp_path, model_dir):
    cfg = tmp_path / "meshserve.json"
    cfg.write_text(json.dumps({"models": [{"name": "flowers", "uri": f"file://{model_dir / 'iris'}"}]}))
    srv = start_server(None, tmp_path / "log", "--config", str(cfg))
    try:
        with urllib.request.urlopen(srv.http_url + "/v2/models/flowers") as r:
            meta = json.load(r)
        assert meta["name"] == "flowers" and meta["inputs"][0]["name"] == "input0"
    finally:
        srv.stop()


def test_sigterm_exits_zero(tmp_path, model_dir):
    srv = start_server(model_dir, tmp_path / "log")
    assert srv.stop() == 0
    assert "shutting down" in srv.log()


def test_python_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "meshserve.server.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("meshserve ")


def _index_and_log(srv) -> str:
    with urllib.request.urlopen(srv.http_url + "/v2/repository/index", data=b"") as r:
        return r.read().decode() + srv.log()


@pytest.mark.parametrize(
    "settings_doc,message",
    [
        ({"runtime": "nosuch"}, "unknown runtime"),
        ({"implementation": "model.py:Nope"}, "has no attribute 'Nope'"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "unknown datatype"),
    ],
)
def test_bad_model_settings_are_reported(tmp_path, settings_doc, message):
    mdir = tmp_path / "models" / "bad"
    mdir.mkdir(parents=True)
    (mdir / "model.py").write_text("from meshserve import Model\nclass M(Model):\n    pass\n")
    (mdir / "model-settings.json").write_text(json.dumps({"implementation": "model.py:M", **settings_doc}))
    srv = start_server(tmp_path / "models", tmp_path / "log", wait_ready=False)
    try:
        deadline = time.monotonic() + 20
        while message not in _index_and_log(srv) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert message in _index_and_log(srv)
        with urllib.request.urlopen(srv.http_url + "/v2/health/live") as r:
            assert r.status == 200
    finally:
        srv.stop()
