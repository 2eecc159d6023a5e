"""The adapters as their own process (``meshserve adapters``) against a separately
started model server; auth; resume after a SIGKILL; ``serve --adapters --workers 2``;
the adapters CLI's one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.adapters.helpers import SCRIPTS, RunningSidecar, start_sidecar, wait_job
from tests.support.server import RunningServer, start_server

SERVER_TOKEN = "model-server-token"
SIDECAR_TOKEN = "sidecar-token"
CLI = [sys.executable, "-m", "meshserve.server.cli"]


def sidecar_env(base: Path, server: RunningServer | None, **extra: str) -> dict[str, str]:
    env = {
        "MESHSERVE_ADAPTERS_STATE_DIR": str(base / "state"),
        "MESHSERVE_ADAPTERS_MODEL_DIR": str(base / "models"),
        "MESHSERVE_ADAPTERS_AUTH_TOKEN": SIDECAR_TOKEN,
        "MESHSERVE_ADAPTERS_MODEL_SERVER_TOKEN": SERVER_TOKEN,
        **extra,
    }
    if server is not None:
        env["MESHSERVE_ADAPTERS_MODEL_SERVER_URL"] = server.http_url
    return env


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = tmp_path_factory.mktemp("sidecar")
    (b / "models").mkdir()
    return b


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[RunningServer]:
    """A plain model server: no --adapters, a token, the model folder the sidecar writes to."""
    s = start_server(base / "models", base / "server.log", env={"MESHSERVE_AUTH_TOKEN": SERVER_TOKEN})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sidecar(base: Path, server: RunningServer) -> Iterator[RunningSidecar]:
    side = start_sidecar(base / "sidecar.log", sidecar_env(base, server))
    yield side
    side.stop()


@pytest.fixture(scope="module")
def client(sidecar: RunningSidecar) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sidecar.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
        yield c


def test_sidecar_trains_and_the_separate_server_serves_the_model(client, server, sidecar):
    r = client.post("/v1/adapters/training/jobs", json={
        "name": "side", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 2, "hyperparameters": {"scale": 4},
        "model": {"name": "scaled-by-four"}})  # fmt: skip
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "succeeded", (job, sidecar.log())
    # Loaded through the server's repository API: it serves there, not on the sidecar.
    with httpx.Client(base_url=server.http_url, headers={"authorization": f"Bearer {SERVER_TOKEN}"}) as s:
        r = s.post("/v2/models/scaled-by-four/infer", json={"inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, -2]}]})  # fmt: skip
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0, -8.0]
        assert "meshserve_adapter_jobs" not in s.get("/metrics").text  # the server knows nothing of jobs
    assert client.post("/v2/models/scaled-by-four/infer", json={}).status_code == 404
    metrics = client.get("/metrics").text
    assert 'meshserve_adapter_jobs{kind="training",state="succeeded"} 1.0' in metrics
    assert 'meshserve_adapter_job_duration_seconds_count{kind="training",state="succeeded"} 1.0' in metrics


def test_a_load_the_server_refuses_fails_the_job_with_the_servers_answer(base, server):
    env = sidecar_env(base, server, MESHSERVE_ADAPTERS_MODEL_SERVER_TOKEN="wrong",
                      MESHSERVE_ADAPTERS_STATE_DIR=str(base / "state-refused"))  # fmt: skip
    side = start_sidecar(base / "refused.log", env)
    try:
        with httpx.Client(base_url=side.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
            r = c.post("/v1/adapters/training/jobs", json={
                "name": "refused", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 1,
                "hyperparameters": {"scale": 1}, "model": {"name": "refused-model"}})  # fmt: skip
            job = wait_job(c, r.json()["id"])
        assert job["state"] == "failed"
        assert "did not load" in job["error"] and "answered 401" in job["error"], job["error"]
    finally:
        side.stop()


def test_every_sidecar_route_wants_its_token_but_the_webhook_and_probes(sidecar, server):
    with httpx.Client(base_url=sidecar.url, timeout=10) as c:
        assert c.get("/v1/adapters/jobs").status_code == 401
        assert c.get("/v1/adapters/jobs", headers={"authorization": f"Bearer {SERVER_TOKEN}"}).status_code == 401
        assert c.get("/v1/adapters/jobs", headers={"x-api-key": SIDECAR_TOKEN}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        # no webhook secret configured here: the route itself answers 401, naming why
        r = c.post("/v1/adapters/events/github", content=b"{}", headers={"X-GitHub-Event": "ping"})
        assert r.status_code == 401 and "webhook secret" in r.json()["error"]


def test_sidecar_refuses_a_non_loopback_bind_without_a_token(base):
    env = sidecar_env(base, None)
    env.pop("MESHSERVE_ADAPTERS_AUTH_TOKEN")
    proc = subprocess.run([*CLI, "adapters", "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True,
                          env={**_os_env(), **env}, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "needs an auth token" in proc.stderr, proc.stderr


def test_a_server_proxying_to_a_sidecar_needs_a_token_too(tmp_path):
    cmd = [*CLI, "serve", "--model-dir", str(tmp_path), "--http-port", "0", "--grpc-port", "0",
           "--adapters-url", "http://127.0.0.1:9"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_os_env())
    assert proc.returncode == 2 and "--adapters-url" in proc.stderr and "auth token" in proc.stderr, proc.stderr


def test_an_unreachable_sidecar_is_503_not_500(tmp_path):
    srv = start_server(tmp_path, tmp_path / "server.log", "--adapters-url", "http://127.0.0.1:9",
                       env={"MESHSERVE_AUTH_TOKEN": SERVER_TOKEN})  # fmt: skip
    try:
        auth = {"authorization": f"Bearer {SERVER_TOKEN}"}
        r = httpx.get(f"{srv.http_url}/v1/adapters/jobs", headers=auth, timeout=10)
        assert r.status_code == 503 and "adapters sidecar is not reachable" in r.json()["error"]
        assert httpx.get(f"{srv.http_url}/v1/adapters/jobs", timeout=10).status_code == 401
        metrics = httpx.get(f"{srv.http_url}/metrics", timeout=10)
        assert metrics.status_code == 200 and "meshserve_" in metrics.text  # the server's own still answer
    finally:
        srv.stop()


def _os_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}


# -- resume --------------------------------------------------------------------------


def _killed_mid_training(base: Path, server: RunningServer, name: str, resume: bool) -> tuple[str, int]:
    """Start a 6-epoch job, SIGKILL the sidecar after its epoch-1 checkpoint; (job id, a worker pid)."""
    state = base / f"state-{name}"
    side = start_sidecar(base / f"{name}.log", sidecar_env(base, server, MESHSERVE_ADAPTERS_STATE_DIR=str(state)))
    with httpx.Client(base_url=side.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
        r = c.post("/v1/adapters/training/jobs", json={
            "name": name, "entrypoint": str(SCRIPTS / "epochs.py"), "workers": 2, "resume": resume,
            "hyperparameters": {"epochs": 6, "epoch_seconds": 0.4}})  # fmt: skip
        assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    checkpoint = state / "jobs" / job_id / "checkpoints" / "epoch-1.json"
    deadline = time.monotonic() + 30
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), side.log()
    pids = [int(line.split()[0]) for line in subprocess.run(["pgrep", "-P", str(side.proc.pid)], capture_output=True,
                                                             text=True).stdout.split()]  # fmt: skip
    side.proc.send_signal(signal.SIGKILL)  # no cleanup code runs
    side.proc.wait()
    return job_id, pids[0]


def test_a_job_killed_mid_training_resumes_with_only_the_epochs_it_had_left(base, server):
    job_id, worker = _killed_mid_training(base, server, "resumable", resume=True)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists(), "a worker outlived its sidecar"
    state = base / "state-resumable"
    done = sorted(p.name for p in (state / "jobs" / job_id / "checkpoints").iterdir())
    last = max(int(n.split("-")[1].split(".")[0]) for n in done if n.endswith(".json"))
    side = start_sidecar(base / "resumable-2.log", sidecar_env(base, server, MESHSERVE_ADAPTERS_STATE_DIR=str(state)))
    try:
        with httpx.Client(base_url=side.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
            job = wait_job(c, job_id, timeout=60)
            assert job["state"] == "succeeded", (job, side.log())
            assert job["metrics"] == {"epochs_run": 6 - (last + 1), "start_epoch": last + 1}
            assert job["result"]["resumed_from"] == f"epoch-{last}.json"
            logs = c.get(f"/v1/adapters/jobs/{job_id}/logs").text
            # both runs' lines are kept: epochs 0..last, then last+1..5 after the resume
            assert f"resumed from epoch-{last}.json" in logs and "epoch=5" in logs and "epoch=0" in logs
    finally:
        side.stop()


def test_resume_off_marks_the_interrupted_job_failed(base, server):
    job_id, _ = _killed_mid_training(base, server, "no-resume", resume=False)
    state = base / "state-no-resume"
    side = start_sidecar(base / "no-resume-2.log", sidecar_env(base, server, MESHSERVE_ADAPTERS_STATE_DIR=str(state)))
    try:
        with httpx.Client(base_url=side.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
            job = c.get(f"/v1/adapters/jobs/{job_id}").json()
            assert job["state"] == "failed" and "stopped while this job was running" in job["error"]
    finally:
        side.stop()


def test_serve_adapters_stopped_mid_training_resumes_the_job_when_it_starts_again(tmp_path):
    """SIGTERM this time, through serve --adapters: the child sidecar stops its workers and
    leaves the job to resume, which the restarted server's sidecar does."""
    (tmp_path / "models").mkdir()
    env = {"MESHSERVE_AUTH_TOKEN": SERVER_TOKEN, "MESHSERVE_ADAPTERS_STATE_DIR": str(tmp_path / "state")}
    auth = {"authorization": f"Bearer {SERVER_TOKEN}"}
    srv = start_server(tmp_path / "models", tmp_path / "first.log", "--adapters", env=env)
    try:
        r = httpx.post(f"{srv.http_url}/v1/adapters/training/jobs", headers=auth, timeout=30, json={
            "name": "graceful", "entrypoint": str(SCRIPTS / "epochs.py"), "workers": 1,
            "hyperparameters": {"epochs": 5, "epoch_seconds": 0.4}})  # fmt: skip
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        checkpoint = tmp_path / "state" / "jobs" / job_id / "checkpoints" / "epoch-0.json"
        deadline = time.monotonic() + 30
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), srv.log()
    finally:
        assert srv.stop() == 0, srv.log()
    again = start_server(tmp_path / "models", tmp_path / "second.log", "--adapters", env=env)
    try:
        with httpx.Client(base_url=again.http_url, timeout=30, headers=auth) as c:
            job = wait_job(c, job_id, timeout=60)
        assert job["state"] == "succeeded", (job, again.log())
        assert job["result"]["resumed_from"].startswith("epoch-")
        assert 0 < job["metrics"]["epochs_run"] < 5 and job["metrics"]["start_epoch"] >= 1
    finally:
        again.stop()


# -- serve --adapters, with workers ---------------------------------------------------------


def test_serve_adapters_with_two_workers_trains_and_serves(tmp_path):
    (tmp_path / "models").mkdir()
    env = {"MESHSERVE_AUTH_TOKEN": SERVER_TOKEN, "MESHSERVE_ADAPTERS_STATE_DIR": str(tmp_path / "state")}
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--adapters", "--workers", "2", env=env)
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30, headers={"authorization": f"Bearer {SERVER_TOKEN}"}) as c:
            r = c.post("/v1/adapters/training/jobs", json={
                "name": "two", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 2,
                "hyperparameters": {"scale": 5}, "model": {"name": "scaled-by-five"}})  # fmt: skip
            assert r.status_code == 201, (r.text, srv.log())
            job = wait_job(c, r.json()["id"])
            assert job["state"] == "succeeded", (job, srv.log())
            for _ in range(6):  # whichever worker answers, the model serves
                r = c.post("/v2/models/scaled-by-five/infer", json={"inputs": [
                    {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})  # fmt: skip
                assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [5.0, 10.0], r.text
            metrics = c.get("/metrics").text  # the server's metrics, then the sidecar's
            assert "meshserve_adapter_jobs" in metrics and "meshserve_adapter_job_duration_seconds" in metrics
            assert c.get("/v1/adapters/jobs", headers={"authorization": "Bearer wrong"}).status_code == 401
    finally:
        assert srv.stop() == 0, srv.log()
    assert "DuplicateTimeseries" not in srv.log()


# -- CLI errors (issue #18) --------------------------------------------------------------------


def test_submit_to_a_server_without_adapters_says_how_to_get_them(server, tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text(json.dumps({"entrypoint": str(SCRIPTS / "scale.py"), "workers": 1}))
    proc = subprocess.run([*CLI, "train", "submit", str(spec), "--server", server.http_url, "--token", SERVER_TOKEN],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "serve --adapters" in proc.stderr and "meshserve adapters" in proc.stderr
    assert "Not Found" not in proc.stderr


def test_train_run_with_a_misspelt_spec_is_one_line_and_exit_2(tmp_path):
    for path in (tmp_path / "trian.yaml", tmp_path):
        proc = subprocess.run([*CLI, "train", "run", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    proc = subprocess.run([*CLI, "workflow", "run", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_workflow_status_prints_indented_json_and_logs_list_steps_in_run_order(sidecar, tmp_path):
    # "zz" runs first, "aa" after it: the logs follow the run, not the names.
    wf = tmp_path / "wf.yaml"
    wf.write_text(json.dumps({"name": "order", "steps": [
        {"name": "zz", "command": [sys.executable, "-c", "print('first')"]},
        {"name": "aa", "depends": ["zz"], "command": [sys.executable, "-c", "print('second')"]}]}))  # fmt: skip
    common = ["--server", sidecar.url, "--token", SIDECAR_TOKEN]
    submitted = subprocess.run([*CLI, "workflow", "submit", str(wf), "--wait", *common], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    status = subprocess.run([*CLI, "workflow", "status", job["id"], *common], capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.startswith("{\n  ")
    assert json.loads(status.stdout)["id"] == job["id"] and json.loads(status.stdout)["state"] == "succeeded"
    logs = subprocess.run([*CLI, "workflow", "logs", job["id"], *common], capture_output=True, text=True).stdout
    assert logs.index("===== step zz") < logs.index("===== step aa"), logs
    missing = subprocess.run([*CLI, "workflow", "status", "nope", *common], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "job 'nope' not found" in missing.stderr
