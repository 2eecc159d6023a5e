"""Submit rendered resources to a Kubernetes API server over HTTPS (httpx), with the
pod's service-account token in cluster or a kubeconfig's token and CA outside."""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from meshserve.protocol.errors import InvalidInput

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PLURALS = {
    "PyTorchJob": "pytorchjobs", "Experiment": "experiments", "Workflow": "workflows",
    "EventSource": "eventsources", "Sensor": "sensors", "ServiceAccount": "serviceaccounts",
    "Role": "roles", "RoleBinding": "rolebindings", "InferenceService": "inferenceservices",
    "TrainJob": "trainjobs", "TFJob": "tfjobs",
}  # fmt: skip


class KubeError(Exception):
    pass


@dataclass
class KubeClient:
    server: str
    token: str | None
    verify: ssl.SSLContext | bool

    @classmethod
    def in_cluster(cls) -> KubeClient:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SA_DIR / "token").exists():
            raise KubeError("not running in a cluster (no service host or service-account token)")
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(), ctx)

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubeClient:
        doc = yaml.safe_load(path.read_text()) or {}
        ctx_name = context or doc.get("current-context")
        ctx = next((c["context"] for c in doc.get("contexts", []) if c.get("name") == ctx_name), None)
        if ctx is None:
            raise KubeError(f"kubeconfig {path}: no context {ctx_name!r}")
        cluster = next((c["cluster"] for c in doc.get("clusters", []) if c.get("name") == ctx["cluster"]), None)
        user = next((u["user"] for u in doc.get("users", []) if u.get("name") == ctx.get("user")), {}) or {}
        if cluster is None:
            raise KubeError(f"kubeconfig {path}: no cluster {ctx['cluster']!r}")
        verify: ssl.SSLContext | bool = True
        if cluster.get("insecure-skip-tls-verify"):
            verify = False
        elif cluster.get("certificate-authority-data"):
            pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
            verify = ssl.create_default_context(cadata=pem)
        elif cluster.get("certificate-authority"):
            verify = ssl.create_default_context(cafile=cluster["certificate-authority"])
        if isinstance(verify, ssl.SSLContext) and user.get("client-certificate-data"):
            with (
                tempfile.NamedTemporaryFile("wb", delete=False) as cert,
                tempfile.NamedTemporaryFile("wb", delete=False) as key,
            ):
                cert.write(base64.b64decode(user["client-certificate-data"]))
                key.write(base64.b64decode(user["client-key-data"]))
            verify.load_cert_chain(cert.name, key.name)
            os.unlink(cert.name)
            os.unlink(key.name)
        token = user.get("token")
        if token is None and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        return cls(cluster["server"].rstrip("/"), token, verify)

    def path_for(self, resource: dict[str, Any], namespace: str) -> str:
        api = resource["apiVersion"]
        plural = PLURALS.get(resource["kind"])
        if plural is None:
            raise KubeError(f"no known plural for kind {resource['kind']!r}")
        base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
        ns = resource.get("metadata", {}).get("namespace") or namespace
        return f"{base}/namespaces/{ns}/{plural}"

    def create(self, resource: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.server + self.path_for(resource, namespace)
        with httpx.Client(verify=self.verify, timeout=30) as client:
            r = client.post(url, json=resource, headers=headers)
        if r.status_code >= 300:
            raise KubeError(f"creating {resource['kind']} failed: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()


def client_for(settings: Any) -> KubeClient:
    if settings.in_cluster:
        return KubeClient.in_cluster()
    if settings.kubeconfig is not None:
        return KubeClient.from_kubeconfig(settings.kubeconfig)
    raise InvalidInput("target 'kubernetes' needs a cluster: set kubeconfig or in_cluster in the adapters' settings")
