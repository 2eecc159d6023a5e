"""The adapters page's examples (examples/adapters/) work: each spec parses, renders
through the CLI into resources the engines' schemas accept, and train.yaml trains a
servable model through ``meshserve train run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, TriggerSpec, WorkflowSpec

from tests.adapters.test_render import errors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "adapters"
DATA_FILES = ["/tmp/meshserve-examples/data/part-0.csv", "/tmp/meshserve-examples/data/part-1.csv"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "meshserve.server.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def render(kind: str, name: str) -> dict:
    proc = cli(kind, "render", f"examples/adapters/{name}")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_the_specs_parse_and_name_the_example_data():
    train = TrainingSpec.model_validate(load("train.yaml"))
    assert train.workers == 2 and train.entrypoint == "meshserve.adapters.trainers.linear:train"
    assert train.data.files == DATA_FILES and train.model is not None and train.model.name == "linear-example"
    exp = ExperimentSpec.model_validate(load("experiment.yaml"))
    assert 2 <= exp.maxTrialCount <= 3 and exp.objective.objectiveMetricName == "loss"
    assert TrainingSpec.model_validate(exp.trialTemplate.trialSpec).data.files == DATA_FILES
    wf = WorkflowSpec.model_validate(load("pipeline.yaml"))
    assert [s.kind for s in wf.steps] == ["check-freshness", "ingest", "train", "evaluate", "deploy"]
    assert wf.steps[2].train is not None and wf.steps[2].train.data.files == DATA_FILES
    # The trigger runs the same pipeline, and the sample push matches it.
    trigger = TriggerSpec.model_validate(json.loads((EXAMPLES / "trigger.json").read_text()))
    assert trigger.workflow == wf
    push = json.loads((EXAMPLES / "push.json").read_text())
    assert push["repository"]["full_name"] == trigger.repository
    assert push["ref"].removeprefix("refs/heads/") in trigger.branches


def test_every_example_renders_to_a_valid_resource():
    job = render("train", "train.yaml")
    assert job["kind"] == "PyTorchJob" and errors("pytorchjob.yaml", job) == []
    tf_job = render("train", "train-tf.yaml")
    assert tf_job["kind"] == "TFJob" and errors("tfjob.yaml", tf_job) == []
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # master + 1 worker = 2
    exp = render("tune", "experiment.yaml")
    assert exp["kind"] == "Experiment" and errors("katib-experiment.yaml", exp) == []
    assert errors("pytorchjob.yaml", exp["spec"]["trialTemplate"]["trialSpec"]) == []
    wf = render("workflow", "pipeline.yaml")
    assert wf["kind"] == "Workflow" and errors("argo-workflow.yaml", wf) == []
    tasks = {t["name"]: t for t in next(t for t in wf["spec"]["templates"] if t["name"] == "main")["dag"]["tasks"]}
    assert tasks["ingest"]["when"] == "{{tasks.check.outputs.result}} == stale"
    assert tasks["deploy"]["dependencies"] == ["evaluate"]


def test_a_broken_copy_of_an_example_is_refused(tmp_path):
    bad = load("train.yaml")
    bad["workers"] = 3  # 2 files cannot feed 3 workers by file
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = cli("train", "render", str(tmp_path / "bad.yaml"))
    assert proc.returncode != 0 and "cannot feed 3 workers" in proc.stderr + proc.stdout


def test_train_yaml_trains_a_model_through_train_run(tmp_path):
    # The specs read /tmp/meshserve-examples/data, which make_data.py writes (the adapters page's first step).
    proc = subprocess.run([sys.executable, str(EXAMPLES / "make_data.py")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for f in DATA_FILES:
        header = Path(f).read_text().splitlines()[0]
        assert header == "id,x1,x2,y"
    proc = cli("train", "run", "examples/adapters/train.yaml", "--state-dir", str(tmp_path / "state"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded"
    assert job["metrics"]["rmse"] < 0.5  # y = 2*x1 - 3*x2 + 1 is learnt
    model = tmp_path / "state" / "models" / "linear-example"
    settings = json.loads((model / "model-settings.json").read_text())
    assert settings["runtime"] == "torch" and (model / "model.pt").is_file()


@pytest.mark.parametrize("name", ["make_data.py", "evaluate.py"])
def test_the_step_scripts_import_as_modules_from_the_repository(name):
    # pipeline.yaml runs them as python3 -m examples.adapters.X with the repository on PYTHONPATH.
    mod = f"examples.adapters.{name.removesuffix('.py')}"
    proc = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd="/", capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
