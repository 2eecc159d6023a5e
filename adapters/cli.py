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
    a = sub.add_parser("adapters", help="run the adapters sidecar (training, tuning, workflows, events)")
    a.add_argument("--host", help="address to bind (default 127.0.0.1; others need an auth token)")
    a.add_argument("--port", type=int, help="port (default 9090)")
    a.add_argument("--model-server", help="the model server's URL (default http://127.0.0.1:8080)")
    a.add_argument("--state-dir", type=Path, help="jobs, logs and outputs")
    a.add_argument("--model-dir", type=Path, help="where trained models go (the model server's --model-dir)")


def _server_flags(a: argparse.ArgumentParser) -> None:
    a.add_argument("--server", default="http://127.0.0.1:8080")
    a.add_argument(
        "--token",
        default=None,
        help="the server's auth token (default: $MESHSERVE_AUTH_TOKEN); --adapters servers require one",
    )


def _headers(args: argparse.Namespace) -> dict[str, str]:
    import os

    token = args.token or os.environ.get("MESHSERVE_AUTH_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


class SpecFileError(Exception):
    """A spec file that cannot be read or parsed: one line, exit status 2."""


def _load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SpecFileError(f"cannot read spec file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise SpecFileError(f"spec file {path} is not YAML or JSON{line}: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise SpecFileError(f"spec file {path}: expected a mapping")
    return doc


def _wait(server: str, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    while True:
        job = httpx.get(f"{server}/v1/adapters/jobs/{job_id}", headers=headers, timeout=10).json()
        if job.get("state") in ("succeeded", "failed"):
            return job
        time.sleep(1)


def run_sidecar(args: argparse.Namespace) -> int:
    from meshserve.adapters import sidecar
    from meshserve.adapters.settings import AdaptersSettings
    from pydantic import ValidationError

    flags = {"host": args.host, "port": args.port, "model_server_url": args.model_server,
             "state_dir": args.state_dir, "model_dir": args.model_dir}  # fmt: skip
    try:
        settings = AdaptersSettings(**{k: v for k, v in flags.items() if v is not None})
        sidecar.check_startup(settings)
    except ValidationError as e:
        print(f"meshserve adapters: invalid settings: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"meshserve adapters: refusing to start: {e}", file=sys.stderr)
        return 2
    from meshserve.server.observe import configure_logging

    configure_logging("info", "text", False)
    sidecar.serve(settings)
    return 0


NO_ADAPTERS = ("{server} has no adapters: start it with `meshserve serve --adapters`, or run the sidecar "
               "(`meshserve adapters`) and pass its URL as --server")  # fmt: skip


def _no_adapters(r: Any) -> bool:
    """A 404 from a server that has no /v1/adapters routes (not a job that is not found)."""
    if r.status_code != 404:
        return False
    try:
        return r.json().get("error") == "Not Found"
    except ValueError:
        return True


def run_command(args: argparse.Namespace) -> int:
    if args.command == "adapters":
        return run_sidecar(args)
    try:
        return _command(args)
    except SpecFileError as e:
        print(f"meshserve {args.command}: {e}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
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
        return 2
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
        fn = {"training": render.training_job, "tuning": render.katib_experiment, "workflow": render.argo_workflow}
        sys.stdout.write(yaml.safe_dump(fn[kind](spec, settings), sort_keys=False))  # type: ignore[operator]
        return 0
    return _run_here(kind, spec, args.state_dir)


def _remote(args: argparse.Namespace, kind: str, submit_path: str) -> int:
    import httpx

    server, headers, action = args.server.rstrip("/"), _headers(args), args.adapter_command
    if action in ("status", "logs"):
        path = f"{server}/v1/adapters/jobs/{args.job}" + ("/logs" if action == "logs" else "")
        r = httpx.get(path, headers=headers, timeout=10)
        if r.status_code != 200:
            return _refused(args, server, r)
        if action == "status":  # as submit --wait prints it
            print(json.dumps(r.json(), indent=2))
        else:
            sys.stdout.write(r.text)
        return 0
    if not args.spec.is_file():
        print(f"meshserve {args.command}: no spec file {args.spec}", file=sys.stderr)
        return 2
    r = httpx.post(f"{server}/v1/adapters/{submit_path}", json=_load(args.spec), headers=headers, timeout=30)
    if r.status_code >= 300:
        return _refused(args, server, r)
    job = r.json()
    if args.wait and "id" in job:
        job = _wait(server, job["id"], headers)
    print(json.dumps(job, indent=2))
    return 0 if job.get("state") != "failed" else 1


def _refused(args: argparse.Namespace, server: str, r: Any) -> int:
    """One line on stderr for a refused request; exit status 1."""
    if _no_adapters(r):
        print(f"meshserve {args.command}: " + NO_ADAPTERS.format(server=server), file=sys.stderr)
        return 1
    try:
        message = r.json().get("error") or r.text
    except ValueError:
        message = r.text.strip()[:500]
    hint = " (pass --token or set MESHSERVE_AUTH_TOKEN)" if r.status_code == 401 else ""
    print(f"meshserve {args.command}: {r.status_code}: {message}{hint}", file=sys.stderr)
    return 1


def _run_here(kind: str, spec: Any, state_dir: Path | None) -> int:
    import asyncio

    from meshserve.adapters.manager import Manager
    from meshserve.adapters.settings import AdaptersSettings

    async def go() -> dict[str, Any]:
        settings = AdaptersSettings(**({"state_dir": state_dir} if state_dir else {}))
        manager = Manager(settings)
        manager.recover(resume=False)  # a run here resumes nothing another process left
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
