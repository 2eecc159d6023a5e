"""Rendered Kubernetes resources against the engines' schemas.

The CRD schemas in schemas/ (see each file's header for its upstream path and commit)
are made strict as ``kubectl --validate=strict`` would be: an unknown field fails.
Pod templates, containers and RBAC objects go through ``kubernetes-validate --strict``;
the Argo resources also round-trip through hera's models (generated from Argo's own
OpenAPI) with nothing lost.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from meshserve.adapters import render
from meshserve.adapters.settings import AdaptersSettings
from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, TriggerSpec, WorkflowSpec

SCHEMAS = Path(__file__).parent / "schemas"
SETTINGS = AdaptersSettings(
    namespace="ml", image="registry.example.com/meshserve:1.0", cache_store="etcd://etcd:2379/data"
)

TRAIN = {
    "name": "linear", "entrypoint": "meshserve.adapters.trainers.linear:train", "workers": 3,
    "data": {"files": ["/data/a.csv", "/data/b.csv", "/data/c.csv"]},
    "hyperparameters": {"lr": 0.1, "epochs": 3}, "model": {"name": "linear"}, "env": {"OMP_NUM_THREADS": "2"},
}  # fmt: skip
EXPERIMENT = {
    "name": "lr-search",
    "objective": {"type": "minimize", "goal": 0.01, "objectiveMetricName": "loss"},
    "algorithm": {"algorithmName": "tpe"},
    "parameters": [
        {"name": "lr", "parameterType": "double", "feasibleSpace": {"min": "0.01", "max": "0.5"}},
        {"name": "epochs", "parameterType": "int", "feasibleSpace": {"min": "2", "max": "8", "step": "2"}},
        {"name": "opt", "parameterType": "categorical", "feasibleSpace": {"list": ["sgd", "adam"]}},
    ],
    "maxTrialCount": 6, "parallelTrialCount": 2, "maxFailedTrialCount": 1,
    "trialTemplate": {
        "trialParameters": [{"name": "learningRate", "reference": "lr"}, {"name": "epochs", "reference": "epochs"},
                            {"name": "optimizer", "reference": "opt", "description": "optimizer"}],
        "trialSpec": {**TRAIN, "hyperparameters": {"lr": "${trialParameters.learningRate}",
                                                   "epochs": "${trialParameters.epochs}",
                                                   "optimizer": "${trialParameters.optimizer}"}},
    },
}  # fmt: skip
WORKFLOW = {
    "name": "seed-loop",
    "steps": [
        {"name": "check", "kind": "check-freshness", "freshness": {"window_seconds": 3600}},
        {"name": "ingest", "kind": "ingest", "depends": ["check"], "command": ["python", "ingest.py"],
         "when": "{{tasks.check.outputs.result}} == stale", "retries": 3, "backoff_seconds": 5},
        {"name": "train", "kind": "train", "depends": ["ingest"], "train": TRAIN},
        {"name": "tune", "kind": "tune", "depends": ["ingest"], "tune": EXPERIMENT},
        {"name": "evaluate", "kind": "evaluate", "depends": ["train", "tune"], "command": ["python", "eval.py"],
         "env": {"THRESHOLD": "0.1"}},
        {"name": "deploy", "kind": "deploy", "depends": ["evaluate"], "model": "linear"},
    ],
}  # fmt: skip
TRIGGER = {"name": "seed", "repository": "acme/models", "branches": ["main", "release"], "workflow": WORKFLOW}


def strict(schema: Any) -> Any:
    """Unknown fields fail, as with server-side field validation: every object schema
    with properties and no additionalProperties or preserve-unknown-fields gets
    additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = strict(yaml.safe_load((SCHEMAS / name).read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(name: str, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(doc)]


def pod_templates(job: dict) -> list[dict]:
    return [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    trigger = TriggerSpec.model_validate(TRIGGER)
    return {
        "job": render.pytorchjob(TrainingSpec.model_validate(TRAIN), SETTINGS),
        "experiment": render.katib_experiment(ExperimentSpec.model_validate(EXPERIMENT), SETTINGS),
        "workflow": render.argo_workflow(WorkflowSpec.model_validate(WORKFLOW), SETTINGS),
        "event_source": render.event_source(trigger, SETTINGS),
        "sensor": render.sensor(trigger, SETTINGS),
        "rbac": render.sensor_rbac(trigger, SETTINGS),
    }


def test_pytorchjob_matches_the_crd_schema(rendered):
    job = rendered["job"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert errors("pytorchjob.yaml", job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    env = {e["name"]: e["value"] for e in replicas["Worker"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["MESHSERVE_TRAIN_SPEC_JSON"])["data"]["files"] == TRAIN["data"]["files"]
    assert env["MESHSERVE_OUTPUT_DIR"] == "/mnt/models/linear" and env["OMP_NUM_THREADS"] == "2"
    # The schema is strict: a misspelt field or a wrong type fails.
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1
    bad["spec"]["runPolicy"]["backoffLimit"] = "zero"
    found = errors("pytorchjob.yaml", bad)
    assert any("'replica' was unexpected" in e for e in found) and any("backoffLimit" in e for e in found)


def test_trainjob_matches_the_trainer_v2_crd_schema():
    spec = TrainingSpec.model_validate({**TRAIN, "kubeflow": {"api": "TrainJob"}})
    job = render.training_job(spec, SETTINGS)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert errors("trainjob.yaml", job) == []
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}  # fmt: skip
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 1
    assert trainer["command"] == ["torchrun", "--module", "meshserve.adapters.worker", TRAIN["entrypoint"]]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["MESHSERVE_OUTPUT_DIR"] == "/mnt/models/linear" and env["OMP_NUM_THREADS"] == "2"
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "meshserve-models"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "models", "mountPath": "/mnt/models"}]}]
    # The schema is strict: a misspelt field or a wrong type fails; PyTorchJob stays the default.
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numNode"] = 3
    bad["spec"]["runtimeRef"]["name"] = ""
    found = errors("trainjob.yaml", bad)
    assert any("'numNode' was unexpected" in e for e in found) and any("runtimeRef/name" in e for e in found)
    assert render.training_job(TrainingSpec.model_validate(TRAIN), SETTINGS)["kind"] == "PyTorchJob"
    from meshserve.adapters.kube import KubeClient

    path = KubeClient("https://k", None, True).path_for(job, "ml")
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"
    # In a rendered workflow, the train step creates the TrainJob and waits on its conditions.
    wf = render.argo_workflow(
        WorkflowSpec.model_validate(
            {"steps": [{"name": "train", "kind": "train", "train": {**TRAIN, "kubeflow": {"api": "TrainJob"}}}]}
        ),
        SETTINGS,
    )
    manifest = yaml.safe_load(wf["spec"]["templates"][1]["resource"]["manifest"])
    assert manifest["kind"] == "TrainJob" and errors("trainjob.yaml", {**manifest, "metadata": {}}) == []


def test_katib_experiment_matches_katib_types_and_its_trial_is_a_pytorchjob(rendered):
    exp = rendered["experiment"]
    assert exp["apiVersion"] == "kubeflow.org/v1beta1" and exp["kind"] == "Experiment"
    upstream_crd = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}  # its whole schema
    jsonschema.validate(exp, upstream_crd)
    assert errors("katib-experiment.yaml", exp) == []
    spec = exp["spec"]
    assert spec["metricsCollectorSpec"]["collector"]["kind"] == "StdOut"
    assert spec["parameters"][1]["feasibleSpace"] == {"min": "2", "max": "8", "step": "2"}
    trial = spec["trialTemplate"]["trialSpec"]
    assert errors("pytorchjob.yaml", trial) == []
    env = {e["name"]: e["value"] for e in pod_templates(trial)[0]["spec"]["containers"][0]["env"]}
    # Katib replaces the placeholders in the trial's text; they survive rendering verbatim.
    hp = json.loads(env["MESHSERVE_TRAIN_SPEC_JSON"])["hyperparameters"]
    assert hp == {"lr": "${trialParameters.learningRate}", "epochs": "${trialParameters.epochs}",
                  "optimizer": "${trialParameters.optimizer}"}  # fmt: skip
    names = {t["name"] for t in spec["trialTemplate"]["trialParameters"]}
    assert names == {"learningRate", "epochs", "optimizer"}
    bad = copy.deepcopy(exp)
    bad["spec"]["objective"]["type"] = "maximise"
    assert errors("katib-experiment.yaml", bad)


def test_argo_workflow_matches_the_schema_and_hera(rendered):
    wf = rendered["workflow"]
    assert errors("argo-workflow.yaml", wf) == []
    templates = {t["name"]: t for t in wf["spec"]["templates"]}
    tasks = {t["name"]: t for t in templates["main"]["dag"]["tasks"]}
    assert tasks["ingest"]["when"] == "{{tasks.check.outputs.result}} == stale"
    assert tasks["evaluate"]["dependencies"] == ["train", "tune"]
    assert templates["ingest"]["retryStrategy"] == {"limit": "3", "retryPolicy": "Always",
                                                    "backoff": {"duration": "5s", "factor": "2"}}  # fmt: skip
    command = templates["check"]["container"]["command"]
    assert command[:4] == ["python", "-m", "meshserve.adapters.steps", "check-freshness"]
    # Train and tune create the engines' own resources, which are valid in turn.
    job = yaml.safe_load(templates["train"]["resource"]["manifest"])
    assert job["kind"] == "PyTorchJob" and errors("pytorchjob.yaml", job) == []
    exp = yaml.safe_load(templates["tune"]["resource"]["manifest"])
    assert exp["kind"] == "Experiment" and errors("katib-experiment.yaml", exp) == []
    # hera's models are generated from Argo's OpenAPI: every field survives the round trip.
    from hera.workflows.models import Workflow

    again = Workflow.model_validate(wf).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert again == wf
    bad = copy.deepcopy(wf)
    bad["spec"]["templates"][0]["dag"]["tasks"][0]["dependsOn"] = ["x"]
    assert any("dependsOn" in e for e in errors("argo-workflow.yaml", bad))


def test_event_source_and_sensor_match_the_schema_and_hera(rendered):
    es, sensor = rendered["event_source"], rendered["sensor"]
    assert errors("argo-events.yaml", es) == [] and errors("argo-events.yaml", sensor) == []
    gh = es["spec"]["github"]["seed"]
    assert gh["repositories"] == [{"owner": "acme", "names": ["models"]}] and gh["events"] == ["push"]
    assert gh["webhookSecret"] == {"name": "seed-github", "key": "secret"}
    dep = sensor["spec"]["dependencies"][0]
    assert dep["eventSourceName"] == "seed" and dep["eventName"] == "seed"
    assert dep["filters"]["data"][0]["value"] == ["refs/heads/main", "refs/heads/release"]
    submitted = sensor["spec"]["triggers"][0]["template"]["argoWorkflow"]["source"]["resource"]
    assert errors("argo-workflow.yaml", submitted) == []
    from hera.events.models import EventSource, Sensor
    from hera.workflows.models import Workflow

    for model, doc in ((EventSource, es), (Sensor, sensor)):
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}  # hera's events models lack them
        expected = copy.deepcopy(body)
        if model is Sensor:  # hera keeps the submitted resource opaque (K8SResource): checked on its own
            expected["spec"]["triggers"][0]["template"]["argoWorkflow"]["source"]["resource"] = {}
            assert Workflow.model_validate(submitted).model_dump(mode="json", by_alias=True, exclude_none=True) \
                == submitted  # fmt: skip
        assert model.model_validate(body).model_dump(mode="json", by_alias=True, exclude_none=True) == expected
    bad = copy.deepcopy(es)
    bad["spec"]["github"]["seed"]["webhook"]["path"] = "/x"
    assert errors("argo-events.yaml", bad)


def _kubernetes_validate(tmp_path: Path, docs: list[dict]) -> subprocess.CompletedProcess:
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).with_name("kubernetes-validate"))
    files = []
    for i, doc in enumerate(docs):
        f = tmp_path / f"{i:02d}-{doc['kind'].lower()}.yaml"
        f.write_text(yaml.safe_dump(doc))
        files.append(str(f))
    return subprocess.run([exe, "--strict", "-k", "1.30.0", *files], capture_output=True, text=True, timeout=120)


def test_pods_containers_and_rbac_pass_kubernetes_validate_strict(rendered, tmp_path):
    trial = rendered["experiment"]["spec"]["trialTemplate"]["trialSpec"]
    templates = pod_templates(rendered["job"]) + pod_templates(trial)
    docs = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}", "namespace": "ml"},
             "template": t} for i, t in enumerate(templates)]  # fmt: skip
    for t in rendered["workflow"]["spec"]["templates"]:
        if "container" in t:  # an Argo container is a core/v1 Container without a required name
            pod = {"spec": {"containers": [{"name": "main", **t["container"]}]}}
            docs.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": t["name"]}, "template": pod})
    docs += rendered["rbac"]
    (tmp_path / "good").mkdir()
    proc = _kubernetes_validate(tmp_path / "good", docs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(docs), proc.stdout
    # The validator itself is strict: a misspelt container field fails.
    bad = copy.deepcopy(docs[0])
    bad["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    (tmp_path / "bad").mkdir()
    proc = _kubernetes_validate(tmp_path / "bad", [bad])
    assert proc.returncode != 0 and "imagePullPolicyy" in proc.stdout + proc.stderr
