"""Run meshserve the way the manifests run it: the Deployment's command, args and
environment (its ConfigMap), and KServe's ServingRuntime container with a model at
/mnt/models; then call the endpoints the probes, the ServiceMonitor and KServe use.

Paths the pod gets from volumes (the model directory, /mnt/models, the cache) and the
ports are mapped to temporary ones; everything else is taken from the rendering."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.deploy import k8s
from tests.deploy.test_manifests import _env, _meshserve_container, _one
from tests.support.server import EXAMPLES, ensure_iris, free_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _start(command: list[str], env: dict[str, str], log: Path, port: int, ready_path: str):
    # `meshserve` is the console script of this package: run the same entry point
    # (meshserve.server.cli:main, checked in test_manifests) with this interpreter and tree.
    assert command[0] == "meshserve"
    argv = [sys.executable, "-m", "meshserve.server.cli", *command[1:]]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    out = open(log, "wb")
    proc = subprocess.Popen(argv, env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=k8s.ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"meshserve exited {proc.returncode}:\n{log.read_text()}"
        try:
            if _get(f"http://127.0.0.1:{port}{ready_path}")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"not ready in 60 s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_deployment_serves_its_probes_and_metrics(tmp_path) -> None:
    ensure_iris()
    docs = k8s.render(k8s.DEPLOY / "overlays" / "embedded")
    _, container = _meshserve_container(docs)
    # The default image (EXTRAS=sklearn) drops the llama2 example, which needs torch.
    models = tmp_path / "models"
    shutil.copytree(EXAMPLES, models, ignore=shutil.ignore_patterns("llama2"))
    env = {k: v for k, v in _env(docs, container).items() if v is not None}
    http, grpc = free_port(), free_port()
    mapped = {
        env["MESHSERVE_MODEL_DIR"]: str(models),  # the image's /models holds examples/models
        env["MESHSERVE_CACHE_DIR"]: str(tmp_path / "cache"),
    }
    env = {k: mapped.get(v, v) for k, v in env.items()}
    env.update(MESHSERVE_HTTP_PORT=str(http), MESHSERVE_GRPC_PORT=str(grpc), MESHSERVE_HOST="127.0.0.1")
    env["HOME"] = str(tmp_path / "home")  # nothing may be written under it (read-only root)
    (tmp_path / "home").mkdir()
    command = [*container["command"], *container["args"]]
    ready = container["readinessProbe"]["httpGet"]["path"]
    proc = _start(command, env, tmp_path / "server.log", http, ready)
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            status, body = _get(f"http://127.0.0.1:{http}{container[probe]['httpGet']['path']}")
            assert status == 200, (probe, body)
        (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
        status, body = _get(f"http://127.0.0.1:{http}{monitor['spec']['endpoints'][0]['path']}")
        assert status == 200 and b"# TYPE" in body
        # The example models of the image are served.
        assert _get(f"http://127.0.0.1:{http}/v2/models/iris/ready")[0] == 200
        assert _get(f"http://127.0.0.1:{http}/v2/models/echo/ready")[0] == 200
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "server.log").read_text()
    assert not any((tmp_path / "home").iterdir()), "the server wrote under $HOME"


def test_kserve_runtime_serves_the_model_at_mnt_models(tmp_path) -> None:
    ensure_iris()
    docs = k8s.render(k8s.DEPLOY / "kserve")
    runtime = _one(docs, "ServingRuntime", "meshserve")
    isvc = _one(docs, "InferenceService", "iris")
    (container,) = runtime["spec"]["containers"]
    name = isvc["metadata"]["name"] + "-isvc"  # a name unlike the folder's own, to see which wins
    mnt = tmp_path / "mnt-models"
    shutil.copytree(EXAMPLES / "iris", mnt)  # what the modelcar links to /mnt/models
    http, grpc = free_port(), free_port()

    def fill(value: str) -> str:  # KServe's {{.Name}} template, and the volume paths
        if value.startswith("/tmp/"):  # the emptyDir at /tmp
            value = str(tmp_path / value.removeprefix("/tmp/"))
        return value.replace("{{.Name}}", name).replace("/mnt/models", str(mnt))

    env = {e["name"]: fill(e["value"]) for e in container["env"]}
    env.update(MESHSERVE_HOST="127.0.0.1", HOME=str(tmp_path))
    args = list(container["args"])
    args[args.index("--http-port") + 1] = str(http)
    args[args.index("--grpc-port") + 1] = str(grpc)
    ready = container["readinessProbe"]["httpGet"]["path"]
    proc = _start([*container["command"], *args], env, tmp_path / "server.log", http, ready)
    try:
        assert _get(f"http://127.0.0.1:{http}/v2/models/{name}/ready")[0] == 200
        body = json.dumps(
            {"inputs": [{"name": "input0", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/v2/models/{name}/infer", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = json.load(r)
        assert answer["model_name"] == name
        assert answer["outputs"][0]["data"] == [0]  # setosa
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "server.log").read_text()
