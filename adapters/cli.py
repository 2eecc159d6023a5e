"""``meshserve train|tune|workflow submit|render|run|status|logs``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

KINDS = {
    "train": ("training", "training/jobs", "training/render", "a training job (Kubeflow PyTorchJob)"),
    "tune": ("tuning", "tuning/experiments", "tuning/render", "a tuning experiment (Katib Experiment)"),
    "workflow": ("workflow", "workflows", "workflows/render", "a pipeline (Argo Workflow)"),
}


def add_parsers(sub: Any) -> None:
    for cmd, (_, _, _, what) in KINDS.items():
        p = sub.add_parser(cmd, help=f"adapters: {what}")
        psub = p.add_subparsers(dest="adapter_command", required=True)
        for action, text in (("submit", "submit to a server"), ("render", "print the Kubernetes resource"),
                             ("run", "run here, without a server")):  # fmt: skip
            a = psub.add_parser(action, help=text)
            a.add_argument("spec", type=Path, help="a YAML or JSON spec file")
            if action == "submit":
                _server_flags(a)
                a.add_argument("--wait", action="store_true", help="wait until the job ends")
            if action == "render":
                a.add_argument("--namespace", default=None)
                a.add_argument("--image", default=None)
            if action == "run":
                a.add_argument("--state-dir", type=Path, default=None)
        for action in ("status", "logs"):
            a = psub.add_parser(action, help=f"a job's {action}")
            a.add_argument("job")
            _server_flags(a)


def _server_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--server", default="http://127.0.0.1:8080")
    a.add_argument("--token", default=None,
                   help="the server's auth token (default: $MESHSERVE_AUTH_TOKEN); --adapters servers require one")


def _headers(args: argparse.Namespace) -> dict[str, str]:
    import os

    token = args.token or os.environ.get("MESHSERVE_AUTH_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


def _load(path: Path) -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: expected a mapping")
    return doc


def _wait(server: str, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    while True:
        job = httpx.get(f"{server}/v1/adapters/jobs/{job_id}", headers=headers, timeout=10).json()
        if job.get("state") in ("succeeded", "failed"):
            return job
        time.sleep(1)


def run_command(args: argparse.Namespace) -> int:
    kind, submit_path, render_path, _ = KINDS[args.command]
    action = args.adapter_command
    if action in ("status", "logs", "submit"):
        import httpx

        try:
            return _remote(args, kind, submit_path)
        except httpx.TransportError as e:
            print(f"meshserve {args.command}: cannot reach {args.server} ({type(e).__name__}: {e}); "
                  "is a server running with --adapters?", file=sys.stderr)  # fmt: skip
            return 1
    if not args.spec.is_file():
        print(f"meshserve {args.command}: no spec file {args.spec}", file=sys.stderr)
        return 1
    from meshserve.adapters import render
    from meshserve.adapters.errors import parse
    from meshserve.adapters.rest import check_experiment, check_workflow
    from meshserve.adapters.settings import AdaptersSettings
    from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, WorkflowSpec

    model = {"training": TrainingSpec, "tuning": ExperimentSpec, "workflow": WorkflowSpec}[kind]
    spec = parse(model, _load(args.spec))
    if isinstance(spec, ExperimentSpec):
        check_experiment(spec)
    if isinstance(spec, WorkflowSpec):
        check_workflow(spec)
    if action == "render":
        import yaml

        overrides = {k: v for k, v in (("namespace", args.namespace), ("image", args.image)) if v}
        settings = AdaptersSettings(**overrides)
        fn = {"training": render.pytorchjob, "tuning": render.katib_experiment, "workflow": render.argo_workflow}
        sys.stdout.write(yaml.safe_dump(fn[kind](spec, settings), sort_keys=False))  # type: ignore[operator]
        return 0
    return _run_here(kind, spec, args.state_dir)


def _remote(args: argparse.Namespace, kind: str, submit_path: str) -> int:
    import httpx

    server, headers, action = args.server.rstrip("/"), _headers(args), args.adapter_command
    if action == "status":
        r = httpx.get(f"{server}/v1/adapters/jobs/{args.job}", headers=headers, timeout=10)
        print(r.text)
        return 0 if r.status_code == 200 else 1
    if action == "logs":
        r = httpx.get(f"{server}/v1/adapters/jobs/{args.job}/logs", headers=headers, timeout=10)
        sys.stdout.write(r.text)
        return 0 if r.status_code == 200 else 1
    if not args.spec.is_file():
        print(f"meshserve {args.command}: no spec file {args.spec}", file=sys.stderr)
        return 1
    r = httpx.post(f"{server}/v1/adapters/{submit_path}", json=_load(args.spec), headers=headers, timeout=30)
    if r.status_code >= 300:
        hint = {401: " (pass --token or set MESHSERVE_AUTH_TOKEN)",
                404: " (is the server started with --adapters?)"}.get(r.status_code, "")  # fmt: skip
        print(f"meshserve {args.command}: {r.status_code} {r.text}{hint}", file=sys.stderr)
        return 1
    job = r.json()
    if args.wait and "id" in job:
        job = _wait(server, job["id"], headers)
    print(json.dumps(job, indent=2))
    return 0 if job.get("state") != "failed" else 1


def _run_here(kind: str, spec: Any, state_dir: Path | None) -> int:
    import asyncio

    from meshserve.adapters.manager import Manager
    from meshserve.adapters.settings import AdaptersSettings

    async def go() -> dict[str, Any]:
        settings = AdaptersSettings(**({"state_dir": state_dir} if state_dir else {}))
        manager = Manager(settings)
        submit = {"training": manager.submit_training, "tuning": manager.submit_experiment,
                  "workflow": manager.submit_workflow}[kind]  # fmt: skip
        job = submit(spec)
        done = await manager.wait(job.id)
        await manager.close()
        return done.to_dict()

    job = asyncio.run(go())
    job.pop("spec", None)
    print(json.dumps(job, indent=2))
    return 0 if job["state"] == "succeeded" else 1
