"""REST routes under /v1/adapters/..., served by the adapters sidecar (adapters/sidecar.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from meshserve.adapters import events, render
from meshserve.adapters.errors import parse
from meshserve.adapters.manager import Manager
from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, TriggerSpec, WorkflowSpec
from meshserve.adapters.training import live_log
from meshserve.protocol.errors import InvalidInput, ModelNotFound
from meshserve.protocol.rest_codec import dumps, encode_error, loads_object

log = logging.getLogger("meshserve.adapters")
PREFIX = "/v1/adapters"


def _json(doc: Any, status: int = 200) -> Response:
    return Response(dumps(doc), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        raise InvalidInput("invalid spec: the request body is empty")
    return loads_object(body)


def check_experiment(spec: ExperimentSpec) -> None:
    """The trial template must make a valid training spec (400 now, not a failed trial later)."""
    from meshserve.adapters.tuning import sample_values, substitute

    parse(TrainingSpec, substitute(spec.trialTemplate.trialSpec, sample_values(spec)), "trialTemplate.trialSpec")


def check_workflow(spec: WorkflowSpec) -> None:
    for step in spec.steps:
        if step.tune is not None:
            check_experiment(step.tune)


async def _submit_kube(manager: Manager, resources: list[dict[str, Any]]) -> Response:
    from meshserve.adapters.kube import KubeError, client_for

    client = client_for(manager.settings)
    created = []
    try:
        for res in resources:
            done = await asyncio.to_thread(client.create, res, manager.settings.namespace)
            created.append({"kind": res["kind"], "name": (done.get("metadata") or {}).get("name")})
    except KubeError as e:
        return Response(encode_error(str(e)), status_code=502, media_type="application/json")
    return _json({"submitted": created}, 201)


def add_routes(app: FastAPI, manager: Manager) -> None:
    s = manager.settings

    def job_or_404(job_id: str):
        job = manager.store.get(job_id)
        if job is None:
            raise ModelNotFound(f"job {job_id!r} not found")
        return job

    # -- training ---------------------------------------------------------------
    @app.post(f"{PREFIX}/training/jobs", summary="Submit a training job", status_code=201)
    async def submit_training(request: Request) -> Response:
        spec = parse(TrainingSpec, await _body(request))
        if spec.target == "kubernetes":
            return await _submit_kube(manager, [render.training_job(spec, s)])
        return _json(manager.submit_training(spec).to_dict(), 201)

    @app.post(f"{PREFIX}/training/render", summary="A training spec as a Kubeflow PyTorchJob or TrainJob")
    async def render_training(request: Request) -> Response:
        return _json(render.training_job(parse(TrainingSpec, await _body(request)), s))

    # -- tuning ---------------------------------------------------------------
    @app.post(f"{PREFIX}/tuning/experiments", summary="Start a tuning experiment", status_code=201)
    async def submit_experiment(request: Request) -> Response:
        spec = parse(ExperimentSpec, await _body(request))
        check_experiment(spec)
        if spec.target == "kubernetes":
            return await _submit_kube(manager, [render.katib_experiment(spec, s)])
        return _json(manager.submit_experiment(spec).to_dict(), 201)

    @app.post(f"{PREFIX}/tuning/render", summary="An experiment as a Katib Experiment")
    async def render_experiment(request: Request) -> Response:
        spec = parse(ExperimentSpec, await _body(request))
        check_experiment(spec)
        return _json(render.katib_experiment(spec, s))

    # -- workflows --------------------------------------------------------------
    @app.post(f"{PREFIX}/workflows", summary="Run a workflow", status_code=201)
    async def submit_workflow(request: Request) -> Response:
        spec = parse(WorkflowSpec, await _body(request))
        check_workflow(spec)
        if spec.target == "kubernetes":
            return await _submit_kube(manager, [render.argo_workflow(spec, s)])
        return _json(manager.submit_workflow(spec).to_dict(), 201)

    @app.post(f"{PREFIX}/workflows/render", summary="A workflow as an Argo Workflow")
    async def render_workflow(request: Request) -> Response:
        spec = parse(WorkflowSpec, await _body(request))
        check_workflow(spec)
        return _json(render.argo_workflow(spec, s))

    # -- jobs -------------------------------------------------------------------
    @app.get(f"{PREFIX}/jobs", summary="Adapter jobs, newest first")
    async def list_jobs(kind: str | None = None, state: str | None = None, parent: str | None = None,
                        limit: int = 100) -> Response:  # fmt: skip
        return _json({"jobs": [j.to_dict() for j in manager.store.list(kind, state, parent, min(limit, 1000))]})

    @app.get(f"{PREFIX}/jobs/{{job_id}}", summary="One job")
    async def get_job(job_id: str) -> Response:
        return _json(job_or_404(job_id).to_dict())

    @app.get(f"{PREFIX}/jobs/{{job_id}}/logs", summary="A job's logs (text)")
    async def job_logs(job_id: str) -> Response:
        job = job_or_404(job_id)
        job_dir = manager.job_dir(job.id)
        if job.kind == "workflow":  # steps in the order they ran
            steps = (job.result or {}).get("steps") or {}
            order = {name: (rec.get("started") or float("inf"), i) for i, (name, rec) in enumerate(steps.items())}
            files = sorted((job_dir / "steps").glob("*.log"), key=lambda p: (order.get(p.stem, (float("inf"), 0)),
                                                                           p.stem))  # fmt: skip
            text = "".join(f"===== step {p.stem} =====\n" + p.read_text(errors="replace") for p in files)
        elif job.kind == "tuning":
            trials = sorted(manager.store.list(parent=job.id, limit=1000), key=lambda j: j.created)
            text = "".join(f"===== trial {t.name} ({t.id}, {t.state}) =====\n" + live_log(manager.job_dir(t.id))
                           for t in trials)  # fmt: skip
        else:
            text = live_log(job_dir)
        return PlainTextResponse(text)

    @app.delete(f"{PREFIX}/jobs/{{job_id}}", summary="Cancel a job")
    async def cancel_job(job_id: str) -> Response:
        job = job_or_404(job_id)
        if not manager.cancel(job.id):
            raise InvalidInput(f"job {job_id!r} is {job.state}, not running")
        return _json(job_or_404(job_id).to_dict(), 202)

    # -- triggers and events ---------------------------------------------------------
    @app.put(f"{PREFIX}/triggers/{{name}}", summary="Create or replace a GitHub push trigger")
    async def put_trigger(name: str, request: Request) -> Response:
        doc = await _body(request)
        doc.setdefault("name", name)
        spec = parse(TriggerSpec, doc)
        if spec.name != name:
            raise InvalidInput(f"invalid spec: field 'name': {spec.name!r} differs from the path's {name!r}")
        check_workflow(spec.workflow)
        manager.store.put_trigger(name, spec.model_dump(by_alias=True))
        return _json(spec.model_dump(by_alias=True))

    @app.get(f"{PREFIX}/triggers", summary="GitHub push triggers")
    async def list_triggers() -> Response:
        return _json({"triggers": list(manager.store.triggers().values())})

    @app.delete(f"{PREFIX}/triggers/{{name}}", summary="Remove a trigger")
    async def delete_trigger(name: str) -> Response:
        if not manager.store.delete_trigger(name):
            raise ModelNotFound(f"trigger {name!r} not found")
        return _json({})

    @app.get(f"{PREFIX}/triggers/{{name}}/render", summary="A trigger as Argo Events EventSource + Sensor (+RBAC)")
    async def render_trigger(name: str) -> Response:
        doc = manager.store.triggers().get(name)
        if doc is None:
            raise ModelNotFound(f"trigger {name!r} not found")
        return _json({"items": render.trigger_resources(TriggerSpec.model_validate(doc), s)})

    @app.post(f"{PREFIX}/events/github", summary="GitHub webhook (push events)")
    async def github(request: Request) -> Response:
        body = await request.body()
        if s.github_secret is None:
            return Response(encode_error("no webhook secret configured (MESHSERVE_ADAPTERS_GITHUB_SECRET)"),
                            status_code=401, media_type="application/json")  # fmt: skip
        if not events.verify(s.github_secret.get_secret_value(), body, request.headers.get(events.SIGNATURE_HEADER)):
            return Response(encode_error(f"bad or missing {events.SIGNATURE_HEADER}"), status_code=401,
                            media_type="application/json")  # fmt: skip
        kind = request.headers.get("X-GitHub-Event", "")
        if kind == "ping":
            return _json({"pong": True})
        delivery = request.headers.get(events.DELIVERY_HEADER, "").strip()
        if not delivery or len(delivery) > 128 or not delivery.isprintable():
            return Response(encode_error(f"missing or malformed {events.DELIVERY_HEADER}"), status_code=400,
                            media_type="application/json")  # fmt: skip
        first = manager.store.claim_delivery(delivery)
        if first is not None:  # a replay (or a redelivery): answer, start nothing
            return _json({**first, "delivery": delivery, "replayed": True, "triggered": []})
        if kind != "push":
            return _json({"ignored": f"event {kind!r}", "triggered": []})
        event = loads_object(body)
        repo, branch, sha = events.push_facts(event)
        started = []
        for doc in manager.store.triggers().values():
            trigger = TriggerSpec.model_validate(doc)
            if events.matches(trigger, repo, branch):
                env = {"MESHSERVE_EVENT_REPOSITORY": repo or "", "MESHSERVE_EVENT_BRANCH": branch or "",
                       "MESHSERVE_EVENT_SHA": sha or ""}  # fmt: skip
                job = manager.submit_workflow(trigger.workflow, env=env)
                started.append({"trigger": trigger.name, "job": job.id})
        answer = {"repository": repo, "branch": branch, "triggered": started}
        manager.store.delivery_result(delivery, answer)
        return _json({**answer, "delivery": delivery}, 202 if started else 200)
