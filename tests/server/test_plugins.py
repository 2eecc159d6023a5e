"""Third-party runtimes plug in by a `meshserve.runtimes` entry point or an import path."""

import json
import os

import httpx

from tests.support.server import start_server

RUNTIME = """import numpy as np
from meshserve import Model


class Doubler(Model):
    def predict(self, request):
        return {"doubled": request.inputs[0].data * 2}
"""


def test_entry_point_and_import_path_runtimes(tmp_path):
    site = tmp_path / "site"
    dist = site / "fakeplugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[meshserve.runtimes]\ndoubler = doubler_runtime:Doubler\n")
    (site / "doubler_runtime.py").write_text(RUNTIME)
    models = tmp_path / "models"
    for name, runtime in (("by_entry_point", "doubler"), ("by_import_path", "doubler_runtime:Doubler")):
        (models / name).mkdir(parents=True)
        (models / name / "model-settings.json").write_text(json.dumps({"runtime": runtime}))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    srv = start_server(models, tmp_path / "log", env=env)
    try:
        doc = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}
        for name in ("by_entry_point", "by_import_path"):
            r = httpx.post(f"{srv.http_url}/v2/models/{name}/infer", json=doc)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0] == {"name": "doubled", "datatype": "INT32", "shape": [2], "data": [2, 4]}
    finally:
        srv.stop()
