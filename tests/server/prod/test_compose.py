"""The composition root builds one FastAPI app per process: with --workers 2 the public and
the peer REST fronts of a worker share it, so --adapters mounts (and registers its metrics)
once, and the server starts and serves."""

from __future__ import annotations

import httpx

from tests.support.server import make_model_dir, start_server

TOKEN = "compose-token"


def test_adapters_with_two_workers_start_and_serve(tmp_path):
    env = {"MESHSERVE_AUTH_TOKEN": TOKEN, "MESHSERVE_ADAPTERS_STATE_DIR": str(tmp_path / "state")}
    srv = start_server(make_model_dir(tmp_path / "models"), tmp_path / "server.log", "--adapters", "--workers", "2",
                       env=env)  # fmt: skip
    try:
        auth = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=srv.http_url, headers=auth, timeout=10) as http:
            assert http.get("/v2/health/ready").status_code == 200
            for _ in range(4):  # either worker may accept the connection
                assert http.get("/v1/adapters/jobs").status_code == 200
            metrics = http.get("/metrics").text
            assert "meshserve_adapter_jobs{" in metrics
    finally:
        srv.stop()
    assert "Duplicate" not in srv.log(), srv.log()[-2000:]
