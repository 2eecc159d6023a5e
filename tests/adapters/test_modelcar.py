"""Trained models shipped as modelcars: a signed push runs train -> package (to Debian's
docker-registry on loopback) -> deploy by digest into a separately started server ->
infer; ``meshserve modelcar build`` from a job's output folder; the rendered forms
(an Argo package step, a KServe InferenceService naming the digest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from meshserve.adapters import render
from meshserve.adapters.events import sign
from meshserve.adapters.settings import AdaptersSettings
from meshserve.adapters.specs import WorkflowSpec

from tests.adapters.helpers import SCRIPTS, RunningSidecar, start_sidecar, wait_job
from tests.deploy import k8s
from tests.loaders.conftest import Registry, start_registry
from tests.support.server import RunningServer, start_server

SERVER_TOKEN = "model-server-token"
SIDECAR_TOKEN = "sidecar-token"
SECRET = "webhook-secret"
CLI = [sys.executable, "-m", "meshserve.server.cli"]
INFER = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = tmp_path_factory.mktemp("modelcar")
    (b / "models").mkdir()
    return b


@pytest.fixture(scope="module")
def registry(base: Path) -> Iterator[Registry]:
    reg = start_registry(base / "registry")
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[RunningServer]:
    """Loads by oci:// digest need --repository-uris any (and so a token); the registry is plain http."""
    env = {"MESHSERVE_AUTH_TOKEN": SERVER_TOKEN, "MESHSERVE_INSECURE_REGISTRIES": "true",
           "MESHSERVE_CACHE_DIR": str(base / "server-cache")}  # fmt: skip
    s = start_server(base / "models", base / "server.log", "--repository-uris", "any", env=env)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sidecar(base: Path, server: RunningServer, registry: Registry) -> Iterator[RunningSidecar]:
    env = {
        "MESHSERVE_ADAPTERS_STATE_DIR": str(base / "state"),
        "MESHSERVE_ADAPTERS_MODEL_DIR": str(base / "models"),
        "MESHSERVE_ADAPTERS_AUTH_TOKEN": SIDECAR_TOKEN,
        "MESHSERVE_ADAPTERS_MODEL_SERVER_URL": server.http_url,
        "MESHSERVE_ADAPTERS_MODEL_SERVER_TOKEN": SERVER_TOKEN,
        "MESHSERVE_ADAPTERS_GITHUB_SECRET": SECRET,
        "MESHSERVE_ADAPTERS_REGISTRY_INSECURE": "true",
    }
    side = start_sidecar(base / "sidecar.log", env)
    yield side
    side.stop()


@pytest.fixture(scope="module")
def client(sidecar: RunningSidecar) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sidecar.url, timeout=30, headers={"authorization": f"Bearer {SIDECAR_TOKEN}"}) as c:
        yield c


def pipeline(registry: Registry) -> dict:
    return {"name": "ship", "steps": [
        {"name": "train", "kind": "train", "train": {
            "name": "seven", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 2,
            "hyperparameters": {"scale": 7}, "model": {"name": "scaled-by-seven"}}},
        {"name": "package", "kind": "package", "depends": ["train"], "model": "scaled-by-seven",
         "image": f"oci://{registry.host}/models/scaled-by-seven"},
        {"name": "deploy", "kind": "deploy", "depends": ["package"], "model": "seven-from-registry",
         "uri": "{{tasks.package.outputs.result}}"},
    ]}  # fmt: skip


def test_push_trains_packages_and_deploys_by_digest(client, server, registry, base):
    trigger = {"repository": "acme/models", "workflow": pipeline(registry)}
    assert client.put("/v1/adapters/triggers/ship", json=trigger).status_code == 200
    body = json.dumps({"ref": "refs/heads/main", "after": "abc", "repository": {"full_name": "acme/models"}}).encode()
    t0 = time.monotonic()
    r = client.post(
        "/v1/adapters/events/github",
        content=body,
        headers={
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(SECRET, body),
        },
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["triggered"][0]["job"])
    took = time.monotonic() - t0
    logs = client.get(f"/v1/adapters/jobs/{job['id']}/logs").text
    assert job["state"] == "succeeded", (job, logs)
    steps = job["result"]["steps"]
    pinned = steps["package"]["result"]
    assert (
        pinned.startswith(f"oci://{registry.host}/models/scaled-by-seven@sha256:") and len(pinned.split(":")[-1]) == 64
    )
    assert f"scaled-by-seven:{job['id']}" in logs  # tagged with the workflow's job id
    # "seven-from-registry" exists only in the registry: the server pulled it by digest.
    assert not (base / "models" / "seven-from-registry").exists()
    with httpx.Client(base_url=server.http_url, timeout=30, headers={"authorization": f"Bearer {SERVER_TOKEN}"}) as s:
        r = s.post("/v2/models/seven-from-registry/infer", json=INFER)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [7.0, 14.0]
    print(f"\npush -> train (2 workers) -> package -> deploy by digest: {took:.1f}s")


def test_package_to_an_unreachable_registry_fails_the_step_with_why(client):
    wf = {"name": "nowhere", "steps": [{"name": "package", "kind": "package", "model": "scaled-by-seven",
                                        "image": "oci://127.0.0.1:1/models/x:1"}]}  # fmt: skip
    job = wait_job(client, client.post("/v1/adapters/workflows", json=wf).json()["id"])
    assert job["state"] == "failed" and "pushing oci://127.0.0.1:1/models/x:1" in job["error"], job


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"name": "p", "kind": "package", "model": "m"}, "image"),
        ({"name": "p", "kind": "package", "model": "m", "image": "oci://r/x@sha256:" + "0" * 64}, "image"),
        ({"name": "d", "kind": "deploy", "model": "m", "uri": "oci://r/x:latest"}, "uri"),
        ({"name": "d", "kind": "deploy", "model": "m", "uri": "{{tasks.p.outputs.result}}"}, "depend on 'p'"),
    ],
)
def test_bad_package_and_deploy_steps_are_400(client, step, field):
    r = client.post("/v1/adapters/workflows", json={"steps": [step]})
    assert r.status_code == 400 and field in r.json()["error"], r.text


def test_modelcar_build_from_a_jobs_output_folder_pulls_back_by_digest(client, registry, tmp_path):
    r = client.post(
        "/v1/adapters/training/jobs",
        json={"name": "out", "entrypoint": str(SCRIPTS / "scale.py"), "workers": 1, "hyperparameters": {"scale": 2}},
    )
    job = wait_job(client, r.json()["id"])
    output = Path(job["result"]["output_dir"])
    assert output.name == "output" and (output / "model.py").exists()
    tag = f"oci://{registry.host}/models/from-output:1"
    built = subprocess.run([*CLI, "modelcar", "build", str(output), "--tag", tag, "--insecure", "--quiet"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert built.returncode == 0, built.stderr
    ref = built.stdout.strip()
    assert ref.startswith(tag + "@sha256:")
    digest_only = f"oci://{registry.host}/models/from-output@{ref.split('@')[1]}"
    pulled = subprocess.run([*CLI, "pull", digest_only, "--insecure", "--quiet", "--cache-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(pulled.stdout.strip())
    assert (folder / "model.py").read_bytes() == (output / "model.py").read_bytes()


def test_the_rendered_pipeline_packages_on_the_shared_volume_and_deploys_an_inference_service(registry):
    settings = AdaptersSettings(namespace="ml", image="registry.example.com/meshserve:1.0")
    wf = render.argo_workflow(WorkflowSpec.model_validate(pipeline(registry)), settings)
    from tests.adapters.test_render import errors

    assert errors("argo-workflow.yaml", wf) == []
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    package = templates["package"]["container"]
    assert package["command"][:3] == ["meshserve", "modelcar", "build"] and "--kserve-compat" in package["command"]
    assert package["command"][3] == "/mnt/models/scaled-by-seven"
    assert wf["spec"]["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "meshserve-models"}}]
    import yaml

    isvc = yaml.safe_load(templates["deploy"]["resource"]["manifest"])
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "{{tasks.package.outputs.result}}"
    assert templates["deploy"]["resource"]["action"] == "apply"
    # The InferenceService (with a real digest in place of the placeholder) passes KServe's CRD schema.
    isvc["metadata"]["namespace"] = "ml"
    isvc["spec"]["predictor"]["model"]["storageUri"] = f"oci://{registry.host}/models/x@sha256:" + "a" * 64
    assert k8s.crd_problems(isvc) == []
    broken = json.loads(json.dumps(isvc))
    broken["spec"]["predictor"]["model"]["storageUrl"] = "x"
    assert k8s.crd_problems(broken)
