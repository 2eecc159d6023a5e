"""Real TensorFlow workers: two processes with TF_CONFIG on 127.0.0.1, under
MultiWorkerMirroredStrategy, each on its own partition; their weights agree after the
all-reduce; the chief's ONNX export serves on meshserve's onnx runtime; the TFJob render."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml
from meshserve.adapters import render
from meshserve.adapters.specs import TrainingSpec
from pydantic import ValidationError

from tests.adapters.helpers import write_partitions
from tests.adapters.test_render import SETTINGS, errors
from tests.support.server import REPO, start_server

SPEC = {
    "name": "tf", "framework": "tensorflow", "entrypoint": "meshserve.adapters.trainers.tf_linear:train",
    "workers": 2, "hyperparameters": {"lr": 0.3, "epochs": 30, "batch_size": 8}, "model": {"name": "tf-linear"},
    "timeout_seconds": 240,
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    if importlib.util.find_spec("tensorflow") is None:  # not imported here: the workers import it
        pytest.skip("tensorflow is not installed (the tensorflow extra; the test extra has it)")
    base = tmp_path_factory.mktemp("tf")
    files = write_partitions(base / "data", parts=2, rows=32)
    spec = copy.deepcopy(SPEC)
    spec["data"] = {"files": files}
    spec["hyperparameters"]["dump_dir"] = str(base / "dump")
    (base / "spec.yaml").write_text(yaml.safe_dump(spec))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.server.cli", "train", "run", str(base / "spec.yaml"),
         "--state-dir", str(base / "st")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nTensorFlow 2-worker job (train run, 30 epochs): {took:.1f}s")
    return base, json.loads(proc.stdout)


def test_each_worker_got_tf_config_and_its_own_partition(trained):
    base, job = trained
    log = (base / "st" / "jobs" / job["id"] / "job.log").read_text()
    assert log.count("===== rank") == 2
    spec = json.loads((base / "st" / "jobs" / job["id"] / "spec.json").read_text())
    assert spec["framework"] == "tensorflow"
    dumps = [json.loads((base / "dump" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [d["rank"] for d in dumps] == [0, 1] and all(d["world"] == 2 for d in dumps)


def test_weights_agree_across_workers_after_allreduce_and_fit_the_data(trained):
    base, job = trained
    a, b = (json.loads((base / "dump" / f"rank-{r}.json").read_text()) for r in range(2))
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["bias"], b["bias"], rtol=0, atol=1e-6)
    # y = 2*x1 - 3*x2 + 1: training moved the weights towards it.
    w = np.asarray(a["weights"]).ravel()
    assert w[0] > 0.5 and w[1] < -0.5, w
    assert job["state"] == "succeeded" and job["metrics"]["loss"] < 0.5, job["metrics"]


def test_the_chiefs_onnx_export_serves_on_the_onnx_runtime(trained, tmp_path):
    base, job = trained
    models = base / "st" / "models"
    assert (models / "tf-linear" / "model.onnx").is_file()
    srv = start_server(models, tmp_path / "server.log")
    try:
        request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 2], "data": [0.5, 0.5, 1.0, 0.0]}]}
        r = httpx.post(f"{srv.http_url}/v2/models/tf-linear/infer", json=request, timeout=30)
        assert r.status_code == 200, r.text + srv.log()
        out = r.json()["outputs"][0]
        assert out["name"] == "output" and out["shape"] == [2, 1]
        dump = json.loads((base / "dump" / "rank-0.json").read_text())
        w, bias = np.asarray(dump["weights"], np.float32), np.asarray(dump["bias"], np.float32)
        expected = np.asarray([[0.5, 0.5], [1.0, 0.0]], np.float32) @ w + bias
        np.testing.assert_allclose(out["data"], expected.ravel(), rtol=1e-5)
    finally:
        srv.stop()


def test_tfjob_matches_the_crd_schema_and_names_its_container_tensorflow():
    spec = TrainingSpec.model_validate({**SPEC, "workers": 3, "data": {"files": ["/d/a", "/d/b", "/d/c"]}})
    job = render.training_job(spec, SETTINGS)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    assert errors("tfjob.yaml", job) == []
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3 and worker["template"]["spec"]["containers"][0]["name"] == "tensorflow"
    bad = copy.deepcopy(job)
    bad["spec"]["tfReplicaSpecs"]["Worker"]["replica"] = 3
    assert any("'replica' was unexpected" in e for e in errors("tfjob.yaml", bad))
    with pytest.raises(ValidationError, match="TensorFlow runtime"):
        TrainingSpec.model_validate({**SPEC, "kubeflow": {"api": "TrainJob"}})
