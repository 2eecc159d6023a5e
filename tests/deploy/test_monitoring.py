"""deploy/monitoring: every metric the Grafana dashboard and the alert rules query is one
meshserve exports, and the rules pass `promtool check rules`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from meshserve.server.llm.metrics import COUNTERS, GAUGES
from meshserve.server.observe import PHASES

from tests.deploy import k8s

MONITORING = k8s.DEPLOY / "monitoring"
SERVER = k8s.ROOT / "server"
PROMETHEUS_BUILTIN = {"up"}  # series Prometheus adds to every target
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
_REGISTERED = re.compile(r"\b(Counter|Gauge|Histogram)(?:MetricFamily)?\(\s*\"(meshserve_\w+)\"")
_LLM_HISTOGRAM = re.compile(r"\bh\(\s*\"(meshserve_llm_\w+)\"")


def exported() -> set[str]:
    """Series names the server's collectors register, from their sources (LLM and fleet
    metrics appear only on a server with an LLM or a fleet, so a plain /metrics lacks them)."""
    kinds: dict[str, str] = {}
    for path in SERVER.rglob("*.py"):
        text = path.read_text()
        for kind, name in _REGISTERED.findall(text):
            kinds[name] = kind.lower()
        for name in _LLM_HISTOGRAM.findall(text):
            kinds[name] = "histogram"
    kinds.update({name: "counter" for _, name, _ in COUNTERS})
    kinds.update({name: "gauge" for _, name, _ in GAUGES})
    kinds.update({f"meshserve_inference_{phase}_duration_seconds": "histogram" for phase in PHASES})
    return {name + suffix for name, kind in kinds.items() for suffix in SUFFIXES[kind]}


def rules() -> dict:
    (doc,) = yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text())
    return doc


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rules()["spec"]["groups"] for r in g["rules"]]


def used_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bmeshserve_\w+", expr))
    if re.search(r"\bup\s*\{", expr):
        names.add("up")
    return names


def test_the_source_scan_matches_what_a_real_server_exports(server):
    """The exported set is read from sources; a live /metrics must agree with it."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    live = {m for m in re.findall(r"^(meshserve_\w+?)(?:\{| )", text, re.M) if not m.endswith("_created")}
    assert live, "no meshserve_ series on /metrics"
    assert live <= exported(), f"exported by the server but missed by the scan: {sorted(live - exported())}"


@pytest.mark.parametrize("where", ["dashboard", "rules"])
def test_every_metric_queried_is_exported(where):
    exprs = dashboard_exprs() if where == "dashboard" else rule_exprs()
    assert exprs
    known = exported() | PROMETHEUS_BUILTIN
    used = set().union(*(used_names(e) for e in exprs))
    assert used and not used - known, f"{where} queries metrics meshserve does not export: {sorted(used - known)}"


def test_a_misspelt_metric_would_be_caught():
    assert used_names("sum(rate(meshserve_cache_hit_total[5m]))") - exported() == {"meshserve_cache_hit_total"}


def test_the_rules_cover_the_alerts_the_issue_asks_for():
    alerts = {r["alert"]: r for g in rules()["spec"]["groups"] for r in g["rules"]}
    for needed in ("CacheThrash", "ModelLoadFailures", "High5xxRate", "LLMQueueSaturated", "FleetPodMissing"):
        assert f"Meshserve{needed}" in alerts
    doc = rules()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]


def test_promtool_accepts_the_rules(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:  # `make system-deps` installs it (Debian's prometheus package)
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    path = tmp_path / "meshserve.rules.yaml"
    path.write_text(yaml.safe_dump(rules()["spec"]))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in out.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path):
    """The check above can fail: promtool refuses an expression that does not parse."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    spec = rules()["spec"]
    spec["groups"][0]["rules"][0]["expr"] = "sum by (pod) (rate(meshserve_evictions_total[5m])"
    path = tmp_path / "broken.rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
