"""The embedded engines in-process (no server): workflow DAG semantics, tuning budgets,
the store across restarts, cancellation, freshness stores (file and a real etcd),
webhook signatures, and submission to a Kubernetes API over a real socket."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from meshserve.adapters.events import matches, push_facts, sign, verify
from meshserve.adapters.freshness import CacheStore, check
from meshserve.adapters.manager import Manager
from meshserve.adapters.settings import AdaptersSettings
from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, TriggerSpec, WorkflowSpec
from meshserve.adapters.store import JobStore
from meshserve.protocol.errors import InvalidInput

from tests.adapters.helpers import SCRIPTS
from tests.support.server import free_port

PY = sys.executable


def run(coro):
    return asyncio.run(coro)


def manager(tmp_path: Path, **kw) -> Manager:
    return Manager(AdaptersSettings(state_dir=tmp_path / "state", cache_store=f"file://{tmp_path}/stamp", **kw))


def step(name: str, code: str = "print('ok')", **kw) -> dict:
    return {"name": name, "command": [PY, "-c", code], **kw}


def test_workflow_runs_independent_steps_in_parallel_and_in_dag_order(tmp_path):
    # a -> (b, c) -> d; b and c each sleep 1 s, and their spans (each step's own clock) overlap.
    marks, spans = tmp_path / "marks", tmp_path / "spans"
    note = (
        "import time,sys; t=time.time(); open(%r,'a').write(sys.argv[1]+' '); time.sleep(%s); "
        f"open({str(spans)!r},'a').write(f'{{sys.argv[1]}} {{t}} {{time.time()}}\\n'); print(sys.argv[1])"
    )
    wf = WorkflowSpec.model_validate({"steps": [
        {"name": "d", "depends": ["b", "c"], "command": [PY, "-c", note % (str(marks), 0), "d"]},
        {"name": "b", "depends": ["a"], "command": [PY, "-c", note % (str(marks), 1), "b"]},
        {"name": "c", "depends": ["a"], "command": [PY, "-c", note % (str(marks), 1), "c"]},
        {"name": "a", "command": [PY, "-c", note % (str(marks), 0), "a"]},
    ]})  # fmt: skip

    async def go():
        m = manager(tmp_path)
        t0 = time.monotonic()
        job = await m.wait(m.submit_workflow(wf).id)
        return job, time.monotonic() - t0

    job, took = run(go())
    assert job.state == "succeeded", job.error
    order = marks.read_text().split()
    assert order[0] == "a" and order[-1] == "d" and set(order[1:3]) == {"b", "c"}
    span = {n: (float(t0), float(t1)) for n, t0, t1 in (line.split() for line in spans.read_text().splitlines())}
    assert span["b"][0] < span["c"][1] and span["c"][0] < span["b"][1], span  # b and c ran at once
    assert span["a"][1] <= min(span["b"][0], span["c"][0]) and span["d"][0] >= max(span["b"][1], span["c"][1])
    assert took < 10  # the spans are the check; this only bounds a hang
    assert {n: r["result"] for n, r in job.result["steps"].items()} == {"a": "a", "b": "b", "c": "c", "d": "d"}


def test_retries_back_off_and_a_flaky_step_succeeds(tmp_path):
    counter = tmp_path / "count"
    flaky = (f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); n=int(p.read_text()) if p.exists() else 0; "
             "p.write_text(str(n+1)); sys.exit(0 if n >= 2 else 1)")  # fmt: skip
    wf = WorkflowSpec.model_validate({"steps": [step("flaky", flaky, retries=3, backoff_seconds=0.2)]})

    async def go():
        m = manager(tmp_path)
        t0 = time.monotonic()
        return await m.wait(m.submit_workflow(wf).id), time.monotonic() - t0

    job, took = run(go())
    assert job.state == "succeeded" and job.result["steps"]["flaky"]["attempts"] == 3
    assert took >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s
    log = (tmp_path / "state" / "jobs" / job.id / "steps" / "flaky.log").read_text()
    assert log.count("--- failed: exited with code 1") == 2


def test_step_timeout_kills_the_step(tmp_path):
    wf = WorkflowSpec.model_validate({"steps": [step("slow", "import time; time.sleep(60)", timeout_seconds=0.5)]})

    async def go():
        m = manager(tmp_path)
        t0 = time.monotonic()
        return await m.wait(m.submit_workflow(wf).id), time.monotonic() - t0

    job, took = run(go())
    assert job.state == "failed" and "timed out" in job.error and took < 10


def test_workflow_spec_rejects_cycles_and_bad_conditions():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cycle"):
        WorkflowSpec.model_validate({"steps": [step("a", depends=["b"]), step("b", depends=["a"])]})
    with pytest.raises(ValidationError, match="when"):
        WorkflowSpec.model_validate({"steps": [step("a", when="{{tasks.x.outputs.result}} stale")]})
    with pytest.raises(ValidationError, match="unique"):
        WorkflowSpec.model_validate({"steps": [step("a"), step("a")]})


def _experiment(tmp_path: Path, **over) -> ExperimentSpec:
    doc = {
        "objective": {"type": "minimize", "objectiveMetricName": "loss", "goal": 0.0001},
        "algorithm": {"algorithmName": "random", "algorithmSettings": [{"name": "random_state", "value": "1"}]},
        "parameters": [{"name": "scale", "parameterType": "double", "feasibleSpace": {"min": "0", "max": "1"}}],
        "maxTrialCount": 3, "parallelTrialCount": 3, "maxFailedTrialCount": 0,
        "trialTemplate": {"trialParameters": [{"name": "s", "reference": "scale"}], "trialSpec": {
            "entrypoint": str(SCRIPTS / "scale.py"), "workers": 1, "hyperparameters": {"scale": "${trialParameters.s}"},
            "model": {"name": "m", "serve": False}}},
    }  # fmt: skip
    doc.update(over)
    return ExperimentSpec.model_validate(doc)


def test_tuning_fails_once_failed_trials_exceed_the_budget(tmp_path):
    exp = _experiment(tmp_path, trialTemplate={"trialParameters": [{"name": "s", "reference": "scale"}],
                                               "trialSpec": {"entrypoint": str(SCRIPTS / "no_model.py"), "workers": 1,
                                                             "model": {"name": "m"}}})  # fmt: skip

    async def go():
        m = manager(tmp_path)
        return await m.wait(m.submit_experiment(exp).id)

    job = run(go())
    assert job.state == "failed" and "maxFailedTrialCount=0" in job.error
    assert all(t["state"] == "failed" and "no model" in t["error"] for t in job.result["trials"])
    assert not (tmp_path / "state" / "models").exists()  # nothing registered


def test_tuning_runs_trials_in_parallel_and_picks_the_best(tmp_path):
    exp = _experiment(tmp_path)
    exp.trialTemplate.trialSpec["hyperparameters"]["sleep"] = 1
    exp.trialTemplate.trialSpec["hyperparameters"]["spans"] = str(tmp_path / "spans")

    async def go():
        m = manager(tmp_path, max_running_trainings=3)
        t0 = time.monotonic()
        return await m.wait(m.submit_experiment(exp).id), time.monotonic() - t0

    job, took = run(go())
    assert job.state == "succeeded", job.error
    values = [t["value"] for t in job.result["trials"]]
    assert len(values) == 3 and job.result["best"]["loss"] == min(values)
    spans = [tuple(map(float, line.split())) for line in (tmp_path / "spans").read_text().splitlines()]
    assert len(spans) == 3 and max(s for s, _ in spans) < min(e for _, e in spans), spans  # all three at once
    assert took < 30  # the spans are the check; this only bounds a hang
    assert (tmp_path / "state" / "models" / "m" / "model.py").exists()  # the best one was kept


def test_store_survives_restart_and_fails_interrupted_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    done = store.create("training", "a", {"x": 1})
    store.update(done, state="succeeded", metrics={"loss": 0.5}, finished=time.time())
    running = store.create("workflow", "b", {})
    store.update(running, state="running", started=time.time())
    queued = store.create("trial", "c", {}, parent=running.id)
    store.put_trigger("t", {"name": "t"})
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    assert sorted(again.fail_interrupted()) == sorted([running.id, queued.id])
    assert again.get(done.id).state == "succeeded" and again.get(done.id).metrics == {"loss": 0.5}
    assert again.get(running.id).state == "failed" and "while this job was running" in again.get(running.id).error
    assert again.get(queued.id).parent == running.id and "was queued" in again.get(queued.id).error
    assert again.counts()[("workflow", "failed")] == 1 and again.triggers() == {"t": {"name": "t"}}


def test_cancel_kills_the_workers(tmp_path):
    spec = TrainingSpec.model_validate({"entrypoint": str(SCRIPTS / "sleeper.py"), "workers": 2})

    async def go():
        m = manager(tmp_path)
        job = m.submit_training(spec)
        pid_file = tmp_path / "state" / "jobs" / job.id / "rank1.pid"
        for _ in range(200):
            if pid_file.exists():
                break
            await asyncio.sleep(0.05)
        assert m.cancel(job.id)
        return await m.wait(job.id, timeout=20), int(pid_file.read_text())

    job, pid = run(go())
    assert job.state == "failed" and job.error == "cancelled"
    assert not Path(f"/proc/{pid}").exists()


def test_freshness_file_store_both_ways(tmp_path):
    store = CacheStore(f"file://{tmp_path}/stamp")

    async def go():
        never = await check(store, 60)
        await store.touch(time.time() - 120)  # updated two minutes ago
        old = await check(store, 60)
        await store.touch()
        new = await check(store, 60)
        return never, old, new

    never, old, new = run(go())
    assert never == (False, None)
    assert old[0] is False and 119 < old[1] < 130
    assert new[0] is True and new[1] < 5
    with pytest.raises(InvalidInput, match="unsupported scheme"):
        CacheStore("redis://localhost/key")


@pytest.fixture
def etcd(tmp_path):
    exe = shutil.which("etcd")
    if exe is None:
        pytest.fail("etcd is not installed (make system-deps installs etcd-server)")
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(
        [exe, "--data-dir", str(tmp_path / "etcd"), "--name", "t",
         "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    yield client
    proc.terminate()
    proc.wait(10)


def test_freshness_etcd_store_both_ways(etcd):
    store = CacheStore(f"etcd://127.0.0.1:{etcd}/meshserve/data-updated")

    async def go():
        for _ in range(100):  # etcd starts in well under a second
            try:
                first = await check(store, 60)
                break
            except Exception:
                await asyncio.sleep(0.1)
        await store.touch(time.time() - 600)
        stale = await check(store, 60)
        await store.touch()
        return first, stale, await check(store, 60)

    first, stale, fresh = run(go())
    assert first == (False, None) and stale[0] is False and fresh[0] is True


def test_github_signature_and_push_matching():
    body = b'{"ref":"refs/heads/main"}'
    good = sign("k", body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify("k", body, good)
    assert not verify("k", body + b" ", good) and not verify("other", body, good)
    assert not verify("k", body, None) and not verify("k", body, good.replace("sha256=", "sha1="))
    event = {"ref": "refs/heads/release", "after": "f00", "repository": {"full_name": "Acme/Models"}}
    repo, branch, sha = push_facts(event)
    trigger = TriggerSpec.model_validate({"name": "t", "repository": "acme/models", "branches": ["release"],
                                          "workflow": {"steps": [step("a")]}})  # fmt: skip
    assert (branch, sha) == ("release", "f00") and matches(trigger, repo, branch)
    assert not matches(trigger, repo, "main") and push_facts({"ref": "refs/tags/v1"})[1] is None


def test_kubernetes_submission_posts_the_resource_with_the_token(tmp_path):
    """The scaled-out path against a stand-in API server on a real socket."""
    from meshserve.adapters.kube import KubeClient
    from meshserve.adapters.render import pytorchjob

    seen: list[tuple[str, str, dict]] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization", ""), body))
            out = json.dumps({**body, "metadata": {**body["metadata"], "uid": "1"}}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "tok-123"}}]}))  # fmt: skip
    try:
        client = KubeClient.from_kubeconfig(kubeconfig)
        settings = AdaptersSettings(state_dir=tmp_path, namespace="ml")
        job = pytorchjob(TrainingSpec.model_validate({"entrypoint": "a.b:c", "workers": 2}), settings)
        created = client.create(job, "ml")
    finally:
        server.shutdown()
    from meshserve.adapters.kube import client_for

    with pytest.raises(InvalidInput, match="kubeconfig"):
        client_for(AdaptersSettings(state_dir=tmp_path))  # target kubernetes without a cluster: 400
    path, auth, body = seen[0]
    assert path == "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs" and auth == "Bearer tok-123"
    assert body == job and created["metadata"]["uid"] == "1"


def test_a_model_folder_not_made_by_training_is_never_replaced(tmp_path):
    (tmp_path / "models" / "precious").mkdir(parents=True)
    (tmp_path / "models" / "precious" / "model.joblib").write_text("the user's own model")

    async def go(name: str):
        spec = TrainingSpec.model_validate({"entrypoint": str(SCRIPTS / "scale.py"), "workers": 1,
                                            "hyperparameters": {"scale": 1}, "model": {"name": name}})  # fmt: skip
        m = Manager(AdaptersSettings(state_dir=tmp_path / "state", model_dir=tmp_path / "models"))
        return await m.wait(m.submit_training(spec).id)

    job = run(go("precious"))
    assert job.state == "failed" and "was not made by a training job" in job.error
    assert (tmp_path / "models" / "precious" / "model.joblib").read_text() == "the user's own model"
    # A folder a training job made is replaced by the next run.
    assert run(go("mine")).state == "succeeded" and run(go("mine")).state == "succeeded"
    assert (tmp_path / "models" / "mine" / "model.py").exists()


def test_row_and_file_sharding_give_disjoint_covering_partitions(tmp_path, monkeypatch):
    from meshserve.adapters import worker
    from meshserve.adapters.trainers.linear import read_rows

    from tests.adapters.helpers import write_partitions

    files = write_partitions(tmp_path, parts=3, rows=10)
    seen = {}
    for shard in ("row", "file"):
        spec = tmp_path / f"{shard}.json"
        spec.write_text(json.dumps({"data": {"files": files, "shard": shard}}))
        monkeypatch.setenv("MESHSERVE_TRAIN_SPEC", str(spec))
        monkeypatch.setenv("WORLD_SIZE", "3")
        ids = []
        for rank in range(3):
            monkeypatch.setenv("RANK", str(rank))
            ids.append(set(read_rows(worker.partition(), rank, 3, worker.row_shard())[0]))
        assert all(len(a) == 10 for a in ids) and set.union(*ids) == {f"p{p}-r{i}" for p in range(3) for i in range(10)}
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
        seen[shard] = ids
    assert seen["file"][1] == {f"p1-r{i}" for i in range(10)}  # rank 1 reads file 1 whole
    assert seen["row"][1] != seen["file"][1]  # by row, every rank reads from every file
