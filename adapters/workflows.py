"""The embedded workflow engine: a DAG of steps run as processes on this machine.

Steps start when their dependencies are done (succeeded or skipped), in parallel
where the DAG allows. Each has its own log, retries with exponential backoff, a
timeout, and an Argo-style condition (``when``) over earlier steps' results.
A step's result is the last line of its output (Argo's ``outputs.result``); a
``check-freshness`` step's is ``fresh`` or ``stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from meshserve.adapters.freshness import CacheStore, check
from meshserve.adapters.specs import PINNED, RESULT, WHEN, StepSpec, WorkflowSpec
from meshserve.adapters.store import Job

RESULT_REF = "{{tasks.%s.outputs.result}}"


class StepFailed(Exception):
    pass


def evaluate_when(expr: str, results: dict[str, str]) -> bool:
    text = expr
    for name, value in results.items():
        text = text.replace(RESULT_REF % name, value)
    m = WHEN.match(text)
    assert m is not None  # the spec checked the form
    equal = m["left"] == m["right"]
    return equal if m["op"] == "==" else not equal


async def _command(step: StepSpec, log: Any, env: dict[str, str], cwd: Path) -> str:
    assert step.command is not None
    proc = await asyncio.create_subprocess_exec(
        *step.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, cwd=str(cwd), start_new_session=True,
    )  # fmt: skip
    last = ""

    async def pump() -> None:
        nonlocal last
        assert proc.stdout is not None
        async for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.strip():
                last = line.decode(errors="replace").strip()

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), step.timeout_seconds)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise StepFailed(f"exited with code {proc.returncode}")
    return last


async def _child_job(manager: Any, child: Job, what: str, log: Any) -> tuple[Job, Job]:
    """Wait for a job a step started (training, tuning); a failed one fails the step."""
    log.write(f"{what} job {child.id}\n".encode())
    done = await manager.wait(child.id)
    if done.state != "succeeded":
        raise StepFailed(f"{what} job {child.id} failed: {done.error}")
    return child, done


async def run_step(manager: Any, job: Job, step: StepSpec, log: Any, env: dict[str, str], cwd: Path,
                   results: dict[str, str] | None = None) -> str:  # fmt: skip
    if step.kind in ("command", "evaluate"):
        return await _command(step, log, env, cwd)
    if step.kind == "ingest":
        result = await _command(step, log, env, cwd)
        uri = (step.freshness.store if step.freshness else None) or manager.settings.cache_store
        if uri:
            await CacheStore(uri).touch()
            log.write(f"marked {uri} updated\n".encode())
        return result
    if step.kind == "check-freshness":
        fr = step.freshness
        uri = (fr.store if fr else None) or manager.settings.cache_store
        if not uri:
            raise StepFailed("no cache store: set freshness.store or the adapters' cache_store")
        window = fr.window_seconds if fr else 3600.0
        fresh, age = await check(CacheStore(uri), window)
        age_text = "never updated" if age is None else f"updated {age:.0f}s ago"
        log.write(f"{uri}: {age_text}, window {window:g}s -> {'fresh' if fresh else 'stale'}\n".encode())
        return "fresh" if fresh else "stale"
    if step.kind == "train":
        assert step.train is not None
        child, done = await _child_job(manager, manager.submit_training(step.train, parent=job.id), "training", log)
        log.write(f"metrics {done.metrics}\n".encode())
        return str(done.result.get("model") or child.id)
    if step.kind == "tune":
        assert step.tune is not None
        child, done = await _child_job(manager, manager.submit_experiment(step.tune, parent=job.id), "tuning", log)
        return str(done.result.get("model") or child.id)
    if step.kind == "package":
        assert step.model is not None and step.image is not None
        from meshserve.adapters.modelcar import push_modelcar

        path = manager.model_dir / step.model
        if not path.is_dir():
            raise StepFailed(f"no model {step.model!r} in {manager.model_dir}")
        tagged = ":" in step.image.rsplit("/", 1)[-1]
        image = step.image if tagged else f"{step.image}:{job.id}"
        try:
            pinned = await asyncio.to_thread(push_modelcar, path, image, manager.settings)
        except Exception as e:  # registry refused or unreachable: the step fails with why
            raise StepFailed(f"pushing {image}: {getattr(e, 'message', None) or e}") from None
        log.write(f"pushed {image} as {pinned}\n".encode())
        return pinned
    if step.kind == "deploy":
        assert step.model is not None
        uri = step.uri
        ref = RESULT.match(uri or "")
        if ref:
            uri = (results or {}).get(ref["step"], "")
            if not PINNED.match(uri):
                raise StepFailed(f"step {ref['step']!r} gave {uri!r}, not an oci://...@sha256: reference")
        if uri is not None:  # by digest: the server pulls the modelcar (--repository-uris any)
            config: dict[str, Any] = {"name": step.model, "uri": uri}
            path = None
        else:
            path = manager.model_dir / step.model
            if not path.is_dir():
                raise StepFailed(f"no model {step.model!r} in {manager.model_dir}")
            import orjson

            doc = orjson.loads((path / "model-settings.json").read_bytes())
            config = {**doc, "name": step.model, "uri": str(path.resolve())}
        if manager.registrar is not None:
            from meshserve.adapters.modelserver import ModelServerError

            try:
                await manager.registrar(step.model, path, config)
            except ModelServerError as e:
                raise StepFailed(str(e)) from None
        log.write(f"deployed {step.model}{f' from {uri}' if uri else ''}\n".encode())
        return step.model
    raise StepFailed(f"unknown step kind {step.kind!r}")


def server_env(settings: Any) -> dict[str, str]:
    """Where an evaluate step reaches the model server (its infer), and with which token."""
    env = {"MESHSERVE_MODEL_SERVER_URL": settings.model_server_url}
    if settings.model_server_token is not None:
        env["MESHSERVE_MODEL_SERVER_TOKEN"] = settings.model_server_token.get_secret_value()
    return env


async def run_workflow(manager: Any, job: Job, spec: WorkflowSpec, job_dir: Path,
                       event_env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    from meshserve.adapters.manager import JobFailed

    steps_dir = job_dir / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    states: dict[str, dict[str, Any]] = {s.name: {"state": "pending"} for s in spec.steps}
    results: dict[str, str] = {}
    done_events = {s.name: asyncio.Event() for s in spec.steps}

    def save() -> None:
        manager.store.update(job, result={"steps": states})

    async def one(step: StepSpec) -> None:
        for d in step.depends:
            await done_events[d].wait()
        rec = states[step.name]
        try:
            bad = [d for d in step.depends if states[d]["state"] in ("failed", "omitted")]
            if bad:
                rec.update(state="omitted", reason=f"dependency {bad[0]} did not succeed")
                return
            if step.when and not evaluate_when(step.when, results):
                rec.update(state="skipped", reason=f"when: {step.when}")
                return
            env = {**os.environ, "MESHSERVE_WORKFLOW": spec.name, "MESHSERVE_WORKFLOW_JOB": job.id,
                   **server_env(manager.settings), **event_env, **step.env}  # fmt: skip
            log_path = steps_dir / f"{step.name}.log"
            rec.update(state="running", log=str(log_path), started=time.time())
            save()
            with open(log_path, "ab") as log:
                for attempt in range(step.retries + 1):
                    rec["attempts"] = attempt + 1
                    log.write(f"--- {step.name} ({step.kind}) attempt {attempt + 1}\n".encode())
                    log.flush()
                    try:
                        results[step.name] = await run_step(manager, job, step, log, env, job_dir, results)
                        rec.update(state="succeeded", result=results[step.name], finished=time.time())
                        return
                    except (StepFailed, asyncio.TimeoutError, OSError) as e:
                        msg = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e)
                        log.write(f"--- failed: {msg}\n".encode())
                        rec["error"] = msg
                        if attempt < step.retries:
                            await asyncio.sleep(step.backoff_seconds * (2**attempt))
                rec.update(state="failed", finished=time.time())
        finally:
            save()
            done_events[step.name].set()

    await asyncio.gather(*(one(s) for s in spec.steps))
    failed = [n for n, r in states.items() if r["state"] in ("failed", "omitted")]
    if failed:
        first = next(n for n, r in states.items() if r["state"] == "failed")
        raise JobFailed(f"step {first} failed: {states[first].get('error')}")
    return {"steps": states}
