"""Real torch.distributed: two gloo workers on CPU, each on its own partition, DDP
all-reducing gradients; the built-in linear trainer run through ``meshserve train run``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.adapters.helpers import write_partitions

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("dist")
    files = write_partitions(base / "data", parts=4, rows=24)
    spec = {
        "name": "linear", "entrypoint": "meshserve.adapters.trainers.linear:train", "workers": 2,
        "data": {"files": files, "shard": "file"},
        "hyperparameters": {"lr": 0.1, "epochs": 3, "batch_size": 8, "dump_dir": str(base / "dump")},
        "model": {"name": "linear"}, "timeout_seconds": 120,
    }  # fmt: skip
    (base / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.server.cli", "train", "run", str(base / "spec.yaml"),
         "--state-dir", str(base / "st")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base, files, json.loads(proc.stdout)


def _dumps(base: Path) -> list[dict]:
    return [json.loads((base / "dump" / f"rank-{r}.json").read_text()) for r in range(2)]


def test_each_rank_reads_its_own_disjoint_partition(trained):
    base, files, _ = trained
    r0, r1 = _dumps(base)
    assert r0["files"] == [files[0], files[2]] and r1["files"] == [files[1], files[3]]
    ids0, ids1 = set(r0["ids"]), set(r1["ids"])
    assert ids0 and ids1 and not ids0 & ids1
    assert len(ids0 | ids1) == 4 * 24  # together they cover the data set


def test_allreduced_weights_equal_across_ranks_after_a_step(trained):
    base, _, _ = trained
    r0, r1 = _dumps(base)
    assert r0["world"] == r1["world"] == 2
    for name in r0["after"]:
        np.testing.assert_allclose(r0["after"][name], r1["after"][name], rtol=0, atol=1e-7)
        # DDP broadcast rank 0's initial weights, then averaged the two ranks' gradients:
        # w1 = w0 - lr * (g_rank0 + g_rank1) / 2, which neither rank's own gradient gives.
        np.testing.assert_allclose(r0["before"][name], r1["before"][name], atol=1e-7)
        g0, g1 = np.array(r0["local_grad"][name]), np.array(r1["local_grad"][name])
        assert not np.allclose(g0, g1)
        expected = np.array(r0["before"][name]) - r0["lr"] * (g0 + g1) / 2
        np.testing.assert_allclose(r0["after"][name], expected, rtol=1e-5, atol=1e-6)


def test_rank0_saved_a_servable_model_and_metrics(trained):
    base, _, job = trained
    assert job["state"] == "succeeded", job
    assert job["metrics"]["loss"] >= 0
    model_dir = Path(job["result"]["model_path"])
    settings = json.loads((model_dir / "model-settings.json").read_text())
    assert settings["name"] == "linear" and settings["runtime"] == "torch"
    assert settings["parameters"]["model_class"] == "torch.nn:Linear"
    import torch

    saved = torch.load(model_dir / "model.pt", weights_only=True)
    model = torch.nn.Linear(**settings["parameters"]["model_kwargs"])
    model.load_state_dict(saved)
    assert model(torch.zeros(3, 2)).shape == (3, 1)
    checkpoints = sorted(p.name for p in (Path(job["log_path"]).parent / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0.pt", "epoch-1.pt", "epoch-2.pt"]
    last = torch.load(Path(job["log_path"]).parent / "checkpoints" / "epoch-2.pt")
    assert last["epoch"] == 2 and set(last["model"]) == {"weight", "bias"}
    assert torch.equal(last["model"]["weight"], saved["weight"])
    log = (Path(job["log_path"])).read_text()
    assert "===== rank 0 =====" in log and "===== rank 1 =====" in log and "loss=" in log


def test_the_linear_trainer_resumes_from_its_last_epoch_checkpoint(trained):
    """The checkpoints the 3-epoch job left hold model and optimizer state: a 5-epoch run
    resumed from epoch-2.pt runs only epochs 3 and 4, on both ranks."""
    import asyncio

    from meshserve.adapters.specs import TrainingSpec
    from meshserve.adapters.training import latest_checkpoint, run_training

    base, files, job = trained
    job_dir = base / "st" / "jobs" / job["id"]
    checkpoint = latest_checkpoint(job_dir)
    assert checkpoint is not None and checkpoint.name == "epoch-2.pt"
    assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == ["epoch-0.pt", "epoch-1.pt", "epoch-2.pt"]
    spec = TrainingSpec.model_validate({
        "name": "linear", "entrypoint": "meshserve.adapters.trainers.linear:train", "workers": 2,
        "data": {"files": files}, "hyperparameters": {"lr": 0.1, "epochs": 5, "batch_size": 8},
        "model": {"name": "linear"}, "timeout_seconds": 120})  # fmt: skip
    result = asyncio.run(run_training(spec, base / "resumed", resume_from=checkpoint))
    assert result["metrics"]["epochs_run"] == 2.0
    log = (base / "resumed" / "job.log").read_text()
    assert log.count("resumed from epoch-2.pt") == 2 and "epoch=0" not in log
    assert log.count("epoch=3") == 2 and log.count("epoch=4") == 2
