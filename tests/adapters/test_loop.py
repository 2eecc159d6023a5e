"""The adapters in a real meshserve process: webhook -> workflow -> training -> the
model serves; tuning registers the best trial; bad input; restarts."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from meshserve.adapters.events import sign

from tests.adapters.helpers import SCRIPTS, wait_job
from tests.support.server import RunningServer, start_server

SECRET = "s3cret-for-tests"
REPO_NAME = "acme/models"


TOKEN = "adapters-operator-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _env(base: Path) -> dict[str, str]:
    return {
        "MESHSERVE_AUTH_TOKEN": TOKEN,  # --adapters refuses to start without one
        "MESHSERVE_ADAPTERS_KUBECONFIG": str(base / "kubeconfig"),
        "MESHSERVE_ADAPTERS_NAMESPACE": "ml",
        "MESHSERVE_ADAPTERS_STATE_DIR": str(base / "state"),
        "MESHSERVE_ADAPTERS_GITHUB_SECRET": SECRET,
        "MESHSERVE_ADAPTERS_CACHE_STORE": f"file://{base / 'data-updated'}",
    }


def _start(base: Path, name: str) -> RunningServer:
    (base / "models").mkdir(exist_ok=True)
    return start_server(base / "models", base / f"{name}.log", "--adapters", env=_env(base))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loop")


class KubeApi:
    """A stand-in Kubernetes API on a real socket: records what is created."""

    def __init__(self) -> None:
        import http.server
        import threading

        created = self.created = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                created.append((self.path, self.headers.get("Authorization"), body))
                out = json.dumps(body).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self) -> str:
        return json.dumps({
            "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{self.server.server_port}"}}],
            "users": [{"name": "u", "user": {"token": "sa-token"}}]})  # fmt: skip


@pytest.fixture(scope="module")
def kube(base: Path) -> Iterator[KubeApi]:
    api = KubeApi()
    (base / "kubeconfig").write_text(api.kubeconfig())
    yield api
    api.server.shutdown()


@pytest.fixture(scope="module")
def srv(base: Path, kube: KubeApi) -> Iterator[RunningServer]:
    s = _start(base, "server")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http_url, timeout=30, headers=AUTH) as c:
        yield c


def push(client: httpx.Client, branch: str = "main", repo: str = REPO_NAME, secret: str | None = SECRET,
         event: str = "push", delivery: str | None = None) -> httpx.Response:  # fmt: skip
    body = json.dumps({"ref": f"refs/heads/{branch}", "after": "abc123", "repository": {"full_name": repo}}).encode()
    headers = {"X-GitHub-Event": event, "Content-Type": "application/json",
               "X-GitHub-Delivery": delivery or str(uuid.uuid4())}  # fmt: skip
    if secret is not None:
        headers["X-Hub-Signature-256"] = sign(secret, body)
    return client.post("/v1/adapters/events/github", content=body, headers=headers)


def pipeline(base: Path, server_url: str) -> dict:
    """The seed's loop: check freshness, ingest unless fresh, train, evaluate."""
    data = base / "data"
    ingest = (
        "from tests.adapters.helpers import write_partitions; import sys; "
        f"write_partitions(__import__('pathlib').Path({str(data)!r}), parts=2, rows=32); print('ingested')"
    )
    evaluate = ("import json, urllib.request as u, os; "
                "r = u.Request(os.environ['SERVER'] + '/v2/models/linear-from-push/infer', method='POST', "
                "data=json.dumps({'inputs': [{'name': 'input', 'datatype': 'FP32', 'shape': [1, 2], "
                "'data': [0.5, 0.5]}]}).encode(), headers={'Content-Type': 'application/json', "
                "'Authorization': 'Bearer ' + os.environ['TOKEN']}); "
                "print(json.load(u.urlopen(r))['outputs'][0]['data'][0])")  # fmt: skip
    return {
        "name": "seed-loop",
        "steps": [
            {"name": "check", "kind": "check-freshness", "freshness": {"window_seconds": 600}},
            {"name": "ingest", "kind": "ingest", "depends": ["check"], "command": [sys.executable, "-c", ingest],
             "when": "{{tasks.check.outputs.result}} == stale"},
            {"name": "train", "kind": "train", "depends": ["ingest"], "train": {
                "name": "linear", "entrypoint": "meshserve.adapters.trainers.linear:train", "workers": 2,
                "data": {"files": [str(data / "part-0.csv"), str(data / "part-1.csv")]},
                "hyperparameters": {"lr": 0.2, "epochs": 20, "batch_size": 8},
                "model": {"name": "linear-from-push"}, "timeout_seconds": 120}},
            {"name": "evaluate", "kind": "evaluate", "depends": ["train"], "retries": 1, "backoff_seconds": 0.2,
             "command": [sys.executable, "-c", evaluate], "env": {"SERVER": server_url, "TOKEN": TOKEN}},
        ],
    }  # fmt: skip


# -- bad input first: nothing may be triggered ----------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's wait() is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids_running(script: Path) -> list[int]:
    """Processes whose command line names ``script``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(script).encode() in args:
                pids.append(int(entry.name))
    return pids


def test_bad_or_missing_signature_is_401_and_triggers_nothing(client, base, srv):
    trigger = {"repository": REPO_NAME, "workflow": pipeline(base, srv.http_url)}
    r = client.put("/v1/adapters/triggers/seed", json=trigger)
    assert r.status_code == 200, r.text
    for resp in (push(client, secret="wrong"), push(client, secret=None)):
        assert resp.status_code == 401
        assert "X-Hub-Signature-256" in resp.json()["error"]
    body = b'{"ref": "refs/heads/main"}'
    tampered = client.post("/v1/adapters/events/github", content=body + b" ",
                           headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(SECRET, body)})  # fmt: skip
    assert tampered.status_code == 401
    assert client.get("/v1/adapters/jobs").json()["jobs"] == []


def test_pushes_to_other_branches_or_repos_trigger_nothing(client):
    for r in (push(client, branch="dev"), push(client, repo="acme/other"), push(client, event="issues")):
        assert r.status_code == 200 and r.json()["triggered"] == []
    assert push(client, event="ping").json() == {"pong": True}
    assert client.get("/v1/adapters/jobs").json()["jobs"] == []


@pytest.mark.parametrize(
    ("path", "doc", "field"),
    [
        ("/v1/adapters/training/jobs",
         {"entrypoint": "meshserve.adapters.trainers.linear:train", "workers": 0}, "workers"),
        ("/v1/adapters/training/jobs", {"entrypoint": "not a module", "workers": 1}, "entrypoint"),
        ("/v1/adapters/training/jobs", {"entrypoint": "a.b:c", "workerz": 2}, "workerz"),
        ("/v1/adapters/workflows", {"steps": [{"name": "a", "depends": ["b"], "command": ["true"]}]}, "depends"),
        ("/v1/adapters/workflows", {"steps": [{"name": "a", "kind": "train"}]}, "train"),
        ("/v1/adapters/tuning/experiments", {"objective": {"type": "minimize", "objectiveMetricName": "loss"},
         "parameters": [{"name": "lr", "parameterType": "double", "feasibleSpace": {"min": "1", "max": "0"}}],
         "trialTemplate": {"trialParameters": [], "trialSpec": {}}}, "parameters.0"),
        ("/v1/adapters/triggers/x", {"repository": "no-slash", "workflow": {"steps": [{"name": "a",
         "command": ["true"]}]}}, "repository"),
    ],
)  # fmt: skip
def test_invalid_spec_is_400_naming_the_field(client, path, doc, field):
    r = client.put(path, json=doc) if "triggers" in path else client.post(path, json=doc)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/adapters/training/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


# -- the loop ------------------------------------------------------------------------


def test_push_runs_the_pipeline_and_the_new_model_serves(client, base):
    before = {m["name"] for m in client.post("/v2/repository/index", json={}).json()}
    assert "linear-from-push" not in before
    r = push(client)
    assert r.status_code == 202, r.text
    (started,) = r.json()["triggered"]
    job = wait_job(client, started["job"], timeout=120)
    logs = client.get(f"/v1/adapters/jobs/{job['id']}/logs").text
    assert job["state"] == "succeeded", (job, logs)
    steps = job["result"]["steps"]
    assert steps["check"]["result"] == "stale" and steps["ingest"]["state"] == "succeeded"
    assert steps["train"]["result"] == "linear-from-push"
    # The evaluate step asked the server itself; its answer was one number.
    float(steps["evaluate"]["result"])
    r = client.post("/v2/models/linear-from-push/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 0.5, 0.0, 1.0]}]})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 1] and out["datatype"] == "FP32"
    assert abs(out["data"][0] - 0.5) < 0.6  # y = 2*.5 - 3*.5 + 1 = 0.5 after a short training
    # The training job is a child of the workflow, with its metrics.
    (child,) = client.get("/v1/adapters/jobs", params={"parent": job["id"]}).json()["jobs"]
    assert child["kind"] == "training" and child["state"] == "succeeded" and "loss" in child["metrics"]
    metrics = client.get("/metrics").text
    assert 'meshserve_adapter_jobs{kind="workflow",state="succeeded"} 1.0' in metrics
    assert 'meshserve_adapter_job_duration_seconds_count{kind="training",state="succeeded"} 1.0' in metrics


REPLAYED = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def test_a_replayed_delivery_starts_nothing(client):
    """The same signed delivery sent three times starts one job; a delivery without its id is refused."""
    trigger = {"repository": "acme/replay", "workflow": {"name": "replay-wf", "steps": [
        {"name": "a", "command": ["true"]}]}}  # fmt: skip
    assert client.put("/v1/adapters/triggers/replay", json=trigger).status_code == 200
    first = push(client, repo="acme/replay", delivery=REPLAYED)
    assert first.status_code == 202, first.text
    for _ in range(2):
        again = push(client, repo="acme/replay", delivery=REPLAYED)
        assert again.status_code == 200 and again.json()["replayed"] is True and again.json()["triggered"] == []
    jobs = client.get("/v1/adapters/jobs", params={"limit": 1000}).json()["jobs"]
    assert [j["name"] for j in jobs].count("replay-wf") == 1
    body = b'{"ref": "refs/heads/main", "repository": {"full_name": "acme/replay"}}'
    r = client.post("/v1/adapters/events/github", content=body,
                    headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(SECRET, body)})  # fmt: skip
    assert r.status_code == 400 and "X-GitHub-Delivery" in r.json()["error"]
    assert client.delete("/v1/adapters/triggers/replay").status_code in (200, 204)


def test_deploy_step_reloads_a_trained_model_and_fails_for_an_unknown_one(client):
    wf = {"name": "redeploy", "steps": [{"name": "deploy", "kind": "deploy", "model": "linear-from-push"}]}
    job = wait_job(client, client.post("/v1/adapters/workflows", json=wf).json()["id"])
    assert job["state"] == "succeeded" and job["result"]["steps"]["deploy"]["result"] == "linear-from-push"
    assert client.get("/v2/models/linear-from-push/ready").status_code == 200
    wf["steps"][0]["model"] = "no-such-model"
    job = wait_job(client, client.post("/v1/adapters/workflows", json=wf).json()["id"])
    assert job["state"] == "failed" and "no model 'no-such-model'" in job["error"]


def test_fresh_data_skips_ingestion(client, base):
    # The ingest step above stamped the cache store: within the window the data is fresh.
    wf = {"name": "fresh-check", "steps": [
        {"name": "check", "kind": "check-freshness", "freshness": {"window_seconds": 600}},
        {"name": "ingest", "kind": "ingest", "depends": ["check"], "command": ["false"],
         "when": "{{tasks.check.outputs.result}} == stale"},
        {"name": "after", "depends": ["ingest"], "command": [sys.executable, "-c", "print('ran')"]}]}  # fmt: skip
    job = wait_job(client, client.post("/v1/adapters/workflows", json=wf).json()["id"])
    steps = job["result"]["steps"]
    assert job["state"] == "succeeded", job
    assert steps["check"]["result"] == "fresh" and steps["ingest"]["state"] == "skipped"
    assert steps["after"]["result"] == "ran"
    # A window of 0 makes the same data stale: ingestion runs (and here fails, retried).
    wf["steps"][0]["freshness"]["window_seconds"] = 0
    wf["steps"][1]["retries"] = 1
    wf["steps"][1]["backoff_seconds"] = 0.1
    job = wait_job(client, client.post("/v1/adapters/workflows", json=wf).json()["id"])
    steps = job["result"]["steps"]
    assert steps["check"]["result"] == "stale" and steps["ingest"]["state"] == "failed"
    assert steps["ingest"]["attempts"] == 2 and steps["after"]["state"] == "omitted"
    assert job["state"] == "failed" and "ingest" in job["error"]
    assert "attempt 2" in client.get(f"/v1/adapters/jobs/{job['id']}/logs").text


def test_crashing_worker_fails_its_job_fast_and_others_carry_on(client, base):
    index_before = client.post("/v2/repository/index", json={}).json()
    crash = client.post(
        "/v1/adapters/training/jobs",
        json={"name": "crash", "entrypoint": str(SCRIPTS / "crash.py"), "workers": 2, "model": {"name": "never"}},
    )
    empty = client.post(
        "/v1/adapters/training/jobs",
        json={"name": "empty", "entrypoint": str(SCRIPTS / "no_model.py"), "workers": 1, "model": {"name": "nothing"}},
    )
    good = client.post("/v1/adapters/training/jobs", json={
        "name": "good", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 2, "hyperparameters": {"scale": 2},
        "model": {"name": "scaled-by-two"}})  # fmt: skip
    assert crash.status_code == empty.status_code == good.status_code == 201
    t0 = time.monotonic()
    crashed = wait_job(client, crash.json()["id"], timeout=30)
    assert time.monotonic() - t0 < 20  # rank 0 sleeps 600 s: it was killed, not waited for
    assert crashed["state"] == "failed"
    assert "rank 1 exited with code 3" in crashed["error"] and "boom" in crashed["error"]
    assert "boom" in client.get(f"/v1/adapters/jobs/{crashed['id']}/logs").text
    # Rank 0 is gone: killed while it waited, or before it got as far as writing its pid
    # (rank 1 may crash first on a busy machine: failed once in CI so).
    pid_file = base / "state" / "jobs" / crashed["id"] / "rank0.pid"
    if pid_file.exists():
        assert not _alive(int(pid_file.read_text()))
    assert not [pid for pid in _pids_running(SCRIPTS / "crash.py") if _alive(pid)]
    no_model = wait_job(client, empty.json()["id"])
    assert no_model["state"] == "failed" and "no model" in no_model["error"]
    ok = wait_job(client, good.json()["id"])
    assert ok["state"] == "succeeded", ok
    r = client.post("/v2/models/scaled-by-two/infer", json={"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -1]}]})  # fmt: skip
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [3.0, -2.0]
    # The failed jobs left the mesh as it was: only the good job's model was added.
    after = client.post("/v2/repository/index", json={}).json()
    assert {m["name"] for m in after} - {m["name"] for m in index_before} == {"scaled-by-two"}
    assert not (base / "models" / "nothing").exists() and not (base / "models" / "never").exists()


def test_tuning_runs_trials_and_registers_the_best(client):
    exp = {
        "name": "scale-search",
        "objective": {"type": "minimize", "objectiveMetricName": "loss"},
        "algorithm": {"algorithmName": "grid"},
        "parameters": [{"name": "scale", "parameterType": "double",
                        "feasibleSpace": {"min": "0.1", "max": "0.5", "step": "0.2"}}],
        "maxTrialCount": 5, "parallelTrialCount": 2, "maxFailedTrialCount": 0,
        "trialTemplate": {"trialParameters": [{"name": "s", "reference": "scale"}], "trialSpec": {
            "entrypoint": str(SCRIPTS / "scale.py"), "workers": 1,
            "hyperparameters": {"scale": "${trialParameters.s}"}, "model": {"name": "tuned-scale"}}},
    }  # fmt: skip
    r = client.post("/v1/adapters/tuning/experiments", json=exp)
    assert r.status_code == 201, r.text
    job = wait_job(client, r.json()["id"], timeout=90)
    assert job["state"] == "succeeded", job
    trials = job["result"]["trials"]
    assert sorted(t["params"]["scale"] for t in trials) == pytest.approx([0.1, 0.3, 0.5])  # the grid, once each
    assert job["result"]["best"]["params"]["scale"] == pytest.approx(0.3)
    children = client.get("/v1/adapters/jobs", params={"parent": job["id"]}).json()["jobs"]
    logs = client.get(f"/v1/adapters/jobs/{job['id']}/logs").text
    assert logs.count("===== trial scale-search-trial-") == 3 and "loss=" in logs
    assert len(children) == 3 and all(c["kind"] == "trial" and c["state"] == "succeeded" for c in children)
    r = client.post("/v2/models/tuned-scale/infer", json={"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 10]}]})  # fmt: skip
    assert r.json()["outputs"][0]["data"] == pytest.approx([0.3, 3.0])


def test_render_routes_answer_with_resources(client, kube):
    r = client.post("/v1/adapters/training/render", json={"entrypoint": "a.b:c", "workers": 3})
    assert r.status_code == 200 and r.json()["kind"] == "PyTorchJob"
    assert r.json()["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    items = client.get("/v1/adapters/triggers/seed/render").json()["items"]
    assert [i["kind"] for i in items] == ["EventSource", "Sensor", "ServiceAccount", "Role", "RoleBinding"]
    # Scaled out: the same spec goes to the Kubernetes API as a PyTorchJob, no local job.
    jobs_before = len(client.get("/v1/adapters/jobs", params={"limit": 1000}).json()["jobs"])
    r = client.post("/v1/adapters/training/jobs", json={"name": "remote", "entrypoint": "a.b:c", "workers": 4,
                                                         "target": "kubernetes"})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json() == {"submitted": [{"kind": "PyTorchJob", "name": "remote"}]}
    path, auth, body = kube.created[-1]
    assert path == "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs" and auth == "Bearer sa-token"
    assert body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert len(client.get("/v1/adapters/jobs", params={"limit": 1000}).json()["jobs"]) == jobs_before


def test_cli_submits_waits_and_renders(srv, base):
    import subprocess

    import yaml

    spec = base / "cli-train.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 1,
                                    "hyperparameters": {"scale": 3}, "model": {"name": "from-cli"}}))  # fmt: skip
    cli = [sys.executable, "-m", "meshserve.server.cli"]
    proc = subprocess.run([*cli, "train", "submit", str(spec), "--server", srv.http_url, "--wait", "--token", TOKEN],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded" and job["result"]["model"] == "from-cli"
    logs = subprocess.run([*cli, "train", "logs", job["id"], "--server", srv.http_url], capture_output=True, text=True,
                          env={**os.environ, "MESHSERVE_AUTH_TOKEN": TOKEN})  # fmt: skip
    assert "scale=3.0" in logs.stdout
    wf = base / "cli-wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "cli-wf", "steps": [{"name": "a", "command": ["true"]}]}))
    out = subprocess.run([*cli, "workflow", "render", str(wf), "--namespace", "ml"], capture_output=True, text=True)
    doc = yaml.safe_load(out.stdout)
    assert doc["kind"] == "Workflow" and doc["metadata"] == {"namespace": "ml", "labels":
                                                             {"app.kubernetes.io/managed-by": "meshserve"},
                                                             "generateName": "cli-wf-"}  # fmt: skip
    bad = subprocess.run([*cli, "train", "render", str(wf)], capture_output=True, text=True)
    assert bad.returncode == 1 and "field 'steps'" in bad.stderr


# -- restarts ------------------------------------------------------------------------


def test_jobs_survive_a_restart_and_interrupted_ones_are_failed(base, srv, client):
    done_before = {j["id"]: j["state"] for j in client.get("/v1/adapters/jobs").json()["jobs"]}
    r = client.post("/v1/adapters/training/jobs", json={
        "name": "long", "entrypoint": str(SCRIPTS / "sleeper.py"), "workers": 2})  # fmt: skip
    job_id = r.json()["id"]
    pid_file = base / "state" / "jobs" / job_id / "rank1.pid"
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker_pid = int(pid_file.read_text())
    srv.proc.send_signal(signal.SIGKILL)  # the hard way: no cleanup code runs
    srv.proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker_pid}").exists(), "a worker outlived its server"
    again = _start(base, "restarted")
    try:
        with httpx.Client(base_url=again.http_url, timeout=30, headers=AUTH) as c2:
            jobs = {j["id"]: j for j in c2.get("/v1/adapters/jobs", params={"limit": 1000}).json()["jobs"]}
            assert {k: jobs[k]["state"] for k in done_before} == done_before
            assert jobs[job_id]["state"] == "failed"
            assert "server stopped while this job was running" in jobs[job_id]["error"]
            # Models trained before the restart are found in the model folder and serve again.
            r = c2.post("/v2/models/scaled-by-two/infer", json={"inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]})  # fmt: skip
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 2.0]
            assert c2.get("/v1/adapters/triggers").json()["triggers"][0]["name"] == "seed"
            # Deliveries seen before the restart are still remembered.
            assert push(c2, delivery=REPLAYED, repo="acme/replay").json()["replayed"] is True
    finally:
        again.stop()


def test_bearer_token_guards_adapter_routes_but_webhooks_use_their_signature(base):
    """With auth on, GitHub (which cannot send a bearer token) still reaches the webhook,
    which checks its HMAC; every other adapter route wants the token."""
    env = {**_env(base), "MESHSERVE_AUTH_TOKEN": "op-token", "MESHSERVE_ADAPTERS_STATE_DIR": str(base / "authed")}
    srv = start_server(base / "models", base / "authed.log", "--adapters", env=env)
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as c:
            assert c.get("/v1/adapters/jobs").status_code == 401
            ok = c.get("/v1/adapters/jobs", headers={"Authorization": "Bearer op-token"})
            assert ok.status_code == 200 and ok.json()["jobs"] == []
            assert push(c, event="ping").json() == {"pong": True}  # signed, no bearer token
            assert push(c, secret="wrong", event="ping").status_code == 401
    finally:
        srv.stop()
