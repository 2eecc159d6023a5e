"""deploy/overlays/adapters: the sidecar container agrees with the code (its command, its
settings, the server's proxy flag), is locked down like the server, alone holds a
Kubernetes token, and its Role covers every kind the adapters render."""

from __future__ import annotations

from typing import Any

import pytest
from meshserve.adapters.kube import PLURALS
from meshserve.adapters.settings import AdaptersSettings
from meshserve.server.settings import Settings

from tests.deploy import k8s

pytestmark = pytest.mark.system  # kubectl kustomize runs as a process

OVERLAY = k8s.DEPLOY / "overlays" / "adapters"
SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _docs() -> tuple[dict[str, Any], ...]:
    return k8s.render(OVERLAY)


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _containers() -> dict[str, dict[str, Any]]:
    spec = _one("Deployment", "meshserve")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_the_sidecar_runs_meshserve_adapters_with_real_settings_on_loopback():
    side = _containers()["adapters"]
    assert side["command"] == ["meshserve"] and side["args"] == ["adapters"]
    env = _env(side)
    fields = {f"MESHSERVE_ADAPTERS_{k.upper()}" for k in AdaptersSettings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert env["MESHSERVE_ADAPTERS_HOST"] == "127.0.0.1"
    assert "secretKeyRef" in env["MESHSERVE_ADAPTERS_AUTH_TOKEN"]
    port = int(env["MESHSERVE_ADAPTERS_PORT"])
    assert side["ports"][0]["containerPort"] == port and side["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The server proxies to exactly that port, and must have a token (no optional Secret).
    server = _containers()["meshserve"]
    config = _one("ConfigMap", next(s["configMapRef"]["name"] for s in server["envFrom"]))["data"]
    assert config["MESHSERVE_ADAPTERS_URL"] == f"http://127.0.0.1:{port}"
    assert "adapters_url" in Settings.model_fields
    token = _env(server)["MESHSERVE_AUTH_TOKEN"]["secretKeyRef"]
    assert token["optional"] is False
    # Trained models: one folder for the server's model dir and the sidecar's.
    assert config["MESHSERVE_MODEL_DIR"] == env["MESHSERVE_ADAPTERS_MODEL_DIR"]
    mounts = {m["mountPath"] for m in server["volumeMounts"]} & {m["mountPath"] for m in side["volumeMounts"]}
    assert env["MESHSERVE_ADAPTERS_MODEL_DIR"] in mounts


def test_the_sidecar_is_locked_down_and_alone_holds_the_api_token():
    pod = _one("Deployment", "meshserve")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "meshserve-adapters"
    for name, c in _containers().items():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"] and "memory" in c["resources"]["limits"], name
        has_token = any(m["mountPath"] == SA_PATH for m in c.get("volumeMounts", []))
        assert has_token == (name == "adapters"), name
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["adapters-token"]["projected"]["sources"]
    assert any("serviceAccountToken" in s for s in sources)
    assert _containers()["adapters"]["volumeMounts"][-1]["readOnly"] is True
    assert _one("Deployment", "meshserve")["spec"]["replicas"] == 1  # one job store


def test_the_role_covers_every_kind_the_adapters_create_and_is_bound_to_the_pods_account():
    role = _one("Role", "meshserve-adapters")
    allowed = {(g, r) for rule in role["rules"] if "create" in rule["verbs"]
               for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    groups = {"PyTorchJob": "kubeflow.org", "TFJob": "kubeflow.org", "Experiment": "kubeflow.org",
              "TrainJob": "trainer.kubeflow.org", "Workflow": "argoproj.io", "EventSource": "argoproj.io",
              "Sensor": "argoproj.io", "ServiceAccount": "", "Role": "rbac.authorization.k8s.io",
              "RoleBinding": "rbac.authorization.k8s.io", "InferenceService": "serving.kserve.io"}  # fmt: skip
    for kind, plural in PLURALS.items():
        assert (groups[kind], plural) in allowed, kind
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    binding = _one("RoleBinding", "meshserve-adapters")
    assert binding["roleRef"]["name"] == "meshserve-adapters"
    assert (
        binding["subjects"][0]["name"]
        == _one("Deployment", "meshserve")["spec"]["template"]["spec"]["serviceAccountName"]
    )
    assert not [d for d in _docs() if d["kind"].startswith("Cluster")]
