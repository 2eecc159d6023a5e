"""A cheap trial: the objective is (scale - 0.3)^2; rank 0 writes a python model that
multiplies its input by ``scale`` (so a test can tell which trial's model serves)."""

import json
import os
import time

from meshserve.adapters import worker

hp = worker.hyperparameters()
scale = float(hp["scale"])
started = time.time()
time.sleep(float(hp.get("sleep", 0)))
if hp.get("spans"):  # where a test reads when each trial ran (its own clock, not the test's)
    with open(hp["spans"], "a") as f:
        f.write(f"{started} {time.time()}\n")
worker.report(loss=(scale - 0.3) ** 2, scale=scale)
if worker.rank() == 0:
    out = worker.output_dir()
    (out / "model.py").write_text(
        "import numpy as np\n"
        "from meshserve import InferenceRequest, Model\n\n"
        "class Scale(Model):\n"
        "    def predict(self, request: InferenceRequest):\n"
        f"        return {{'OUTPUT0': request.input('INPUT0').data * np.float32({scale!r})}}\n"
    )
    worker.write_model_settings(
        {
            "name": "scale",
            "implementation": "model.py:Scale",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 2]}],
        }
    )
print(json.dumps({"rank": os.environ["RANK"], "scale": scale}))
