"""deploy/: every Kustomize directory renders, every rendered object validates, and the
manifests agree with the image (Dockerfile) and the server (its flags, ports, settings)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest
from meshserve.server import cli
from meshserve.server.runtimes.registry import BUILTIN
from meshserve.server.settings import Settings

from tests.deploy import k8s

KUSTOMIZATIONS = k8s.kustomizations()
IDS = [str(p.relative_to(k8s.DEPLOY)) for p in KUSTOMIZATIONS]
APPS = [d for d in KUSTOMIZATIONS if d.name in ("base", "embedded", "fleet")]
DOCKERFILE = k8s.ROOT / "Dockerfile"

# Flags and settings that manifests use ahead of the server code that reads them, each
# with the branch that adds it. While the flag is missing from `meshserve serve --help`
# it is allowed here and nowhere else; once it is there it is checked like the others.
PENDING_FLAGS = {"--store": "issue 7 (branch fleet): --store etcd://host:port/prefix"}
PENDING_ENV = {"MESHSERVE_AUTH_TOKEN": "issue 8 (branch prod): bearer-token auth"}
# KServe model format -> the meshserve built-in runtime that reads it.
FORMAT_RUNTIME = {
    "sklearn": "sklearn",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "onnx": "onnx",
    "pytorch": "torch",
    "huggingface": "transformers",
}


# ------------------------------------------------------------- helpers ---
def _kind(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def _meshserve_container(docs) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = _one(docs, "Deployment", "meshserve")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["meshserve"]
    return deployment, containers[0]


def _env(docs, container: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment: envFrom ConfigMaps, then env (valueFrom: None)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(_one(docs, "ConfigMap", ref)["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def _dockerfile() -> list[tuple[str, str]]:
    from tests.test_dockerfile import _final_stage

    return _final_stage()


def _docker_json(keyword: str) -> list[str]:
    values = [args for kw, args in _dockerfile() if kw == keyword]
    assert values, f"Dockerfile final stage has no {keyword}"
    return json.loads(values[-1])


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in _dockerfile():
        if kw == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def serve_flags() -> set[str]:
    """The flags `meshserve serve --help` prints: the real parser, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=k8s.ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", proc.stdout))
    assert {"--model-dir", "--http-port", "--grpc-port"} <= flags, proc.stdout
    return flags


def _check_serve_args(args: list[str], flags: set[str]) -> None:
    """`args` is `serve` plus flags the real parser accepts (values type-checked too)."""
    assert args and args[0] == "serve", f"args must start with the serve subcommand: {args}"
    kept: list[str] = []
    words = iter(args)
    for word in words:
        name = word.split("=", 1)[0]
        if name.startswith("--") and name not in flags:
            assert name in PENDING_FLAGS, f"`meshserve serve` has no flag {name} (flags: {sorted(flags)})"
            if "=" not in word:
                next(words, None)  # its value
            continue
        kept.append(word)
    parser = cli._parser()
    try:
        parser.parse_args(kept)
    except SystemExit as e:
        pytest.fail(f"meshserve rejects {kept}: exit {e.code}")


# ------------------------------------------------------------ validity ---
def test_every_kustomization_is_found() -> None:
    names = set(IDS)
    assert {"base", "overlays/embedded", "overlays/fleet", "kserve", "kserve/modelmesh"} <= names, names


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_renders_and_validates(directory) -> None:
    docs = k8s.render(directory)
    problems = k8s.validate(docs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=IDS)
def test_every_kind_has_a_validator(directory) -> None:
    for doc in k8s.render(directory):
        known = k8s.group_of(doc) in k8s.STANDARD_GROUPS or (doc["apiVersion"], doc["kind"]) in k8s.CRD_SCHEMAS
        assert known, f"no validator for {doc['apiVersion']} {doc['kind']}"


def test_kubectl_renders_kustomize_v5() -> None:
    proc = subprocess.run([k8s.kubectl(), "version", "--client"], capture_output=True, text=True, check=False)
    found = re.search(r"Kustomize Version: v(\d+)\.", proc.stdout)
    assert found and int(found.group(1)) >= 5, proc.stdout + proc.stderr


# -------------------------------------------------- the validator bites ---
def _base_doc(kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(_one(k8s.render(k8s.DEPLOY / "base"), kind, name))


def _kserve_doc(kind: str, name: str, where: str = "kserve") -> dict[str, Any]:
    return copy.deepcopy(_one(k8s.render(k8s.DEPLOY / where), kind, name))


def test_validator_accepts_the_unbroken_documents() -> None:
    docs = [_base_doc("Deployment", "meshserve"), _kserve_doc("ServingRuntime", "meshserve")]
    assert k8s.validate(docs) == []


def test_kubernetes_validate_rejects_a_misplaced_field() -> None:
    broken = _base_doc("Deployment", "meshserve")
    # A classic slip: readOnlyRootFilesystem on the container instead of its securityContext.
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True
    problems = k8s.validate([broken])
    assert problems and any("readOnlyRootFilesystem" in p for p in problems), problems


def test_kubernetes_validate_rejects_a_wrong_type() -> None:
    broken = _base_doc("Service", "meshserve")
    broken["spec"]["ports"][0]["port"] = "eighty"
    assert k8s.validate([broken])


@pytest.mark.parametrize(
    "where,kind,name,mutate,expect",
    [
        (
            "kserve",
            "ServingRuntime",
            "meshserve",
            lambda d: d["spec"]["containers"][0]["securityContext"].update(readonlyRootFilesystem=True),
            "readonlyRootFilesystem",
        ),
        ("kserve", "ServingRuntime", "meshserve", lambda d: d["spec"].pop("containers"), "containers"),
        (
            "kserve",
            "ServingRuntime",
            "meshserve",
            lambda d: d["spec"]["containers"][0]["ports"].append(dict(d["spec"]["containers"][0]["ports"][0])),
            "duplicate",
        ),
        (
            "kserve",
            "ClusterServingRuntime",
            "meshserve-cluster",
            lambda d: d["spec"]["supportedModelFormats"][0].update(priority=0),
            "minimum",
        ),
        (
            "kserve",
            "InferenceService",
            "iris",
            lambda d: d["spec"]["predictor"]["model"].pop("modelFormat"),
            "modelFormat",
        ),
        (
            "kserve",
            "InferenceService",
            "iris",
            lambda d: d["spec"]["predictor"]["model"]["resources"]["limits"].update(memory="2 gigs"),
            "memory",
        ),
        ("kserve", "InferenceService", "iris", lambda d: d["metadata"].update(name="Iris_Model"), "name"),
        ("kserve", "InferenceService", "iris", lambda d: d["spec"].update(predicter={}), "predicter"),
        ("base", "ServiceMonitor", "meshserve", lambda d: d["spec"]["endpoints"][0].update(interval=15), "interval"),
        (
            "base",
            "ServiceMonitor",
            "meshserve",
            lambda d: d["spec"]["endpoints"][0].update(interval="15 sec"),
            "interval",
        ),
        ("base", "ServiceMonitor", "meshserve", lambda d: d["spec"].pop("selector"), "selector"),
    ],
)
def test_crd_validator_rejects_broken_custom_resources(where, kind, name, mutate, expect) -> None:
    doc = copy.deepcopy(_one(k8s.render(k8s.DEPLOY / where), kind, name))
    assert k8s.crd_problems(doc) == []
    mutate(doc)
    problems = k8s.crd_problems(doc)
    assert problems and any(expect in p for p in problems), problems


def test_crd_validator_honours_preserve_unknown_fields() -> None:
    schema = k8s.to_json_schema(
        {
            "type": "object",
            "properties": {
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "map": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        }
    )
    v = k8s._Validator(schema)
    assert v.is_valid({"open": {"anything": [1, {"x": None}]}, "closed": {"a": "x"}, "map": {"k": 1}})
    assert not v.is_valid({"closed": {"b": "x"}})
    assert not v.is_valid({"map": {"k": "one"}})
    assert not v.is_valid({"extra": 1})


# ---------------------------------------------------- security context ---
@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_pods_meet_the_restricted_pod_security_standard(directory) -> None:
    docs = k8s.render(directory)
    specs = _pod_specs(docs)
    assert specs
    for where, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
            assert not sc.get("capabilities", {}).get("add"), (where, c["name"])
            assert sc.get("privileged") is not True, (where, c["name"])
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, (where, c["name"], uid)
            assert "limits" in c.get("resources", {}) and "memory" in c["resources"]["limits"], (where, c["name"])
    # The namespace an overlay creates enforces that standard.
    for ns in _kind(docs, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("where", ["kserve", "kserve/modelmesh"])
def test_kserve_runtime_containers_are_locked_down(where) -> None:
    for sr in [d for d in k8s.render(k8s.DEPLOY / where) if d["kind"].endswith("ServingRuntime")]:
        for c in sr["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, "read-only root: /tmp must be a volume"
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MESHSERVE_CACHE_DIR", "").startswith("/tmp/"), "the fetch cache must be writable"


def test_image_user_matches_the_manifests() -> None:
    user = [args for kw, args in _dockerfile() if kw == "USER"][-1]
    uid, _, gid = user.partition(":")
    for directory in APPS:
        _, container = _meshserve_container(k8s.render(directory))
        assert str(container["securityContext"]["runAsUser"]) == uid
        assert str(container["securityContext"]["runAsGroup"]) == (gid or uid)


# -------------------------------------- the manifests match the server ---
@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_command_is_the_image_entrypoint_and_args_are_real_flags(directory, serve_flags) -> None:
    _, container = _meshserve_container(k8s.render(directory))
    assert container["command"] == _docker_json("ENTRYPOINT") == ["meshserve"]
    assert container["args"][: len(_docker_json("CMD"))] == _docker_json("CMD") == ["serve"]
    # ... and `meshserve` is the console script for meshserve.server.cli:main (tomllib is 3.11+).
    pyproject = (k8s.ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\nmeshserve = "meshserve\.server\.cli:main"$', pyproject, re.M)
    _check_serve_args(container["args"], serve_flags)


@pytest.mark.parametrize("where", ["kserve", "kserve/modelmesh"])
def test_kserve_runtime_command_and_args(where, serve_flags) -> None:
    for sr in [d for d in k8s.render(k8s.DEPLOY / where) if d["kind"].endswith("ServingRuntime")]:
        (container,) = sr["spec"]["containers"]
        assert container["command"] == _docker_json("ENTRYPOINT")
        _check_serve_args(container["args"], serve_flags)


def test_pending_flags_are_used_only_by_the_fleet(serve_flags) -> None:
    for directory in KUSTOMIZATIONS:
        for doc in k8s.render(directory):
            text = json.dumps(doc)
            for flag in set(PENDING_FLAGS) - serve_flags:
                if re.search(rf'"{flag}[="]', text):
                    assert "fleet" in str(directory), f"{flag} ({PENDING_FLAGS[flag]}) used in {directory}"


@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_ports_match_the_image_and_the_server_defaults(directory) -> None:
    docs = k8s.render(directory)
    _, container = _meshserve_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = {
        "http": Settings.model_fields["http_port"].default,
        "grpc": Settings.model_fields["grpc_port"].default,
    }
    assert ports == defaults == {"http": 8080, "grpc": 8081}
    exposed = {int(p.split("/")[0]) for kw, args in _dockerfile() if kw == "EXPOSE" for p in args.split()}
    assert set(ports.values()) <= exposed
    env = _env(docs, container)
    assert env["MESHSERVE_HTTP_PORT"] == str(ports["http"]) and env["MESHSERVE_GRPC_PORT"] == str(ports["grpc"])
    assert _docker_env()["MESHSERVE_HTTP_PORT"] == str(ports["http"])

    service = _one(docs, "Service", "meshserve")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["targetPort"] == "http" and by_name["http"]["appProtocol"] == "http"
    assert by_name["grpc"]["targetPort"] == "grpc" and by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    pod_labels = _one(docs, "Deployment", "meshserve")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_probes_point_at_the_health_endpoints(directory) -> None:
    _, container = _meshserve_container(k8s.render(directory))
    named = {p["name"] for p in container["ports"]}
    expected = {
        "startupProbe": "/v2/health/live",
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == "http" and "http" in named, probe
    # The same endpoint the image's HEALTHCHECK uses.
    healthcheck = [args for kw, args in _dockerfile() if kw == "HEALTHCHECK"][-1]
    assert container["readinessProbe"]["httpGet"]["path"] in healthcheck


@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_settings_are_real_and_paths_writable(directory) -> None:
    docs = k8s.render(directory)
    deployment, container = _meshserve_container(docs)
    env = _env(docs, container)
    fields = {f"MESHSERVE_{name.upper()}" for name in Settings.model_fields}
    for key in env:
        if key.startswith("MESHSERVE_"):
            assert key in fields or key in PENDING_ENV, f"{key} is no meshserve setting"
    # Every setting a ConfigMap holds parses (types, bounds) as the server would read it.
    typed = {k[len("MESHSERVE_") :].lower(): v for k, v in env.items() if v is not None and k.upper() in fields}
    Settings(**typed)
    # The model directory is the one the image ships.
    assert env["MESHSERVE_MODEL_DIR"] == _docker_env()["MESHSERVE_MODEL_DIR"]
    # With a read-only root filesystem the fetch cache and /tmp must be volumes.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for path in (env["MESHSERVE_CACHE_DIR"], "/tmp"):
        assert path in mounts and "emptyDir" in volumes[mounts[path]], path
    # The auth token comes from an optional Secret: pods start without it.
    token = [e for e in container["env"] if e["name"] == "MESHSERVE_AUTH_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_shutdown_drains_within_the_grace_period(directory) -> None:
    docs = k8s.render(directory)
    deployment, container = _meshserve_container(docs)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(_env(docs, container)["MESHSERVE_SHUTDOWN_GRACE_SECONDS"])
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod"
    assert pre_stop + drain < grace, (pre_stop, drain, grace)


@pytest.mark.parametrize("directory", APPS, ids=[d.name for d in APPS])
def test_ingress_hpa_pdb_and_servicemonitor_point_at_real_objects(directory) -> None:
    docs = k8s.render(directory)
    service = _one(docs, "Service", "meshserve")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    pod_labels = _one(docs, "Deployment", "meshserve")["spec"]["template"]["metadata"]["labels"]

    ingresses = {i["metadata"]["name"]: i for i in _kind(docs, "Ingress")}
    assert set(ingresses) == {"meshserve-rest", "meshserve-grpc"}
    for ing in ingresses.values():
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "meshserve" and backend["port"]["name"] in ports
    grpc = ingresses["meshserve-grpc"]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    grpc_port = grpc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["name"]
    assert ports[grpc_port]["appProtocol"] == "kubernetes.io/h2c"
    assert grpc["spec"]["tls"], "gRPC through ingress-nginx needs TLS at the edge"

    for hpa in _kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", "meshserve")
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in [p for p in _kind(docs, "PodDisruptionBudget") if p["metadata"]["name"] == "meshserve"]:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        replicas = min([h["spec"]["minReplicas"] for h in _kind(docs, "HorizontalPodAutoscaler")] or [1])
        assert pdb["spec"]["maxUnavailable"] < replicas, "the PDB must leave a pod serving"

    (monitor,) = _kind(docs, "ServiceMonitor")
    selected = [
        s
        for s in _kind(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["meshserve"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_embedded_is_one_pod_without_autoscaler() -> None:
    docs = k8s.render(k8s.DEPLOY / "overlays" / "embedded")
    assert _one(docs, "Deployment", "meshserve")["spec"]["replicas"] == 1
    assert not _kind(docs, "HorizontalPodAutoscaler")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"meshserve"}


def test_fleet_store_points_at_the_etcd_it_deploys() -> None:
    docs = k8s.render(k8s.DEPLOY / "overlays" / "fleet")
    deployment, container = _meshserve_container(docs)
    assert deployment["spec"]["replicas"] == 3
    assert _one(docs, "HorizontalPodAutoscaler", "meshserve")["spec"]["minReplicas"] == 3
    args = container["args"]
    url = args[args.index("--store") + 1]
    found = re.fullmatch(r"etcd://([a-z0-9-]+):(\d+)/([\w-]+)", url)
    assert found, url
    host, port = found.group(1), int(found.group(2))
    service = _one(docs, "Service", host)
    assert port in [p["port"] for p in service["spec"]["ports"]]
    etcd = _one(docs, "StatefulSet", "meshserve-etcd")
    assert service["spec"]["selector"].items() <= etcd["spec"]["template"]["metadata"]["labels"].items()
    # The static bootstrap list names exactly the StatefulSet's pods via its headless Service.
    replicas, headless = etcd["spec"]["replicas"], etcd["spec"]["serviceName"]
    assert _one(docs, "Service", headless)["spec"]["clusterIP"] == "None"
    (etcd_container,) = etcd["spec"]["template"]["spec"]["containers"]
    cluster = next(a for a in etcd_container["args"] if a.startswith("--initial-cluster="))
    members = dict(m.split("=", 1) for m in cluster.split("=", 1)[1].split(","))
    assert members == {f"meshserve-etcd-{i}": f"http://meshserve-etcd-{i}.{headless}:2380" for i in range(replicas)}
    assert replicas % 2 == 1, "an etcd cluster wants an odd member count"
    quorum = replicas // 2 + 1
    assert _one(docs, "PodDisruptionBudget", "meshserve-etcd")["spec"]["minAvailable"] >= quorum


# ------------------------------------------------------------- KServe ---
def test_kserve_runtime_serves_what_it_claims() -> None:
    docs = k8s.render(k8s.DEPLOY / "kserve")
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"].endswith("ServingRuntime")}
    assert {d["kind"] for d in runtimes.values()} == {"ServingRuntime", "ClusterServingRuntime"}
    for sr in runtimes.values():
        spec = sr["spec"]
        assert spec.get("multiModel") is not True
        assert "v2" in spec["protocolVersions"]
        for fmt in spec["supportedModelFormats"]:
            assert FORMAT_RUNTIME[fmt["name"]] in BUILTIN, fmt
        (container,) = spec["containers"]
        assert container["name"] == "kserve-container"  # the name KServe looks for
        assert [p["containerPort"] for p in container["ports"]] == [Settings.model_fields["http_port"].default]
        env = {e["name"]: e["value"] for e in container["env"]}
        models = json.loads(env["MESHSERVE_MODELS"])
        assert models == [{"name": "{{.Name}}", "uri": "/mnt/models"}]  # KServe's mount point
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    (isvc,) = _kind(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] in runtimes and model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith("oci://")
    formats = [f["name"] for f in runtimes[model["runtime"]]["spec"]["supportedModelFormats"]]
    assert model["modelFormat"]["name"] in formats


def test_modelmesh_example_has_what_modelmesh_expects() -> None:
    docs = k8s.render(k8s.DEPLOY / "kserve" / "modelmesh")
    (sr,) = _kind(docs, "ServingRuntime")
    spec = sr["spec"]
    assert spec["multiModel"] is True
    assert spec["grpcEndpoint"].startswith("port:") and spec["grpcDataEndpoint"].startswith("port:")
    assert sr["metadata"]["labels"]["name"].startswith("modelmesh-serving-")
    assert int(sr["metadata"]["annotations"]["maxLoadingConcurrency"]) >= 1
    grpc_port = Settings.model_fields["grpc_port"].default
    assert spec["grpcDataEndpoint"] == f"port:{grpc_port}"
    assert spec["builtInAdapter"]["runtimeManagementPort"] == grpc_port
    (container,) = spec["containers"]
    assert "--grpc-port" in container["args"]
    assert container["args"][container["args"].index("--grpc-port") + 1] == str(grpc_port)
    isvcs = _kind(docs, "InferenceService")
    assert len(isvcs) >= 2
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    for isvc in isvcs:
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "ModelMesh"
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == sr["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert FORMAT_RUNTIME[model["modelFormat"]["name"]] in BUILTIN
