"""The adapters' job manager: runs training, tuning and workflow jobs as asyncio
tasks, records them in the store, and registers trained models in the mesh."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from meshserve.adapters.modelserver import ModelServer
from meshserve.adapters.settings import AdaptersSettings
from meshserve.adapters.specs import ExperimentSpec, TrainingSpec, WorkflowSpec
from meshserve.adapters.store import Job, JobCollector, JobStore
from meshserve.adapters.training import TrainingFailed, check_model, latest_checkpoint, run_training
from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger("meshserve.adapters")

# Loads (or reloads) model ``name`` from folder ``path`` in the serving mesh.
Registrar = Callable[[str, Path, dict[str, Any]], Awaitable[None]]
# Marks a model folder a training job made (and so may replace).
MARKER = ".meshserve-adapters"
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class JobFailed(Exception):
    pass


class Manager:
    def __init__(self, settings: AdaptersSettings, registrar: Registrar | None = None,
                 model_dir: Path | None = None, model_server: ModelServer | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.state_dir = settings.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.state_dir / "jobs.sqlite")
        self.model_dir = settings.model_dir or model_dir or self.state_dir / "models"
        self.registrar = registrar
        self.model_server = model_server
        self.interrupted: list[str] = []
        self.resumed: list[str] = []
        self._closing = False
        self._tasks: dict[str, asyncio.Task] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._slots: asyncio.Semaphore | None = None
        self.durations: Histogram | None = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(JobCollector(self.store))
        self.durations = Histogram(
            "meshserve_adapter_job_duration_seconds", "Run time of finished adapter jobs.",
            ["kind", "state"], registry=registry, buckets=DURATION_BUCKETS,
        )  # fmt: skip

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    # -- submission -----------------------------------------------------------
    def _start(self, job: Job, work: Callable[[Job], Awaitable[dict[str, Any]]]) -> Job:
        self._done[job.id] = asyncio.Event()
        self._tasks[job.id] = asyncio.ensure_future(self._run(job, work))
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[dict[str, Any]]]) -> None:
        try:
            result = await work(job)
            self._finish(job, "succeeded", result=result)
        except asyncio.CancelledError:
            if not self._closing:
                self._finish(job, "failed", error="cancelled")
            # else: left queued/running, so the next start resumes or fails it (recover)
        except (JobFailed, TrainingFailed) as e:
            self._finish(job, "failed", error=str(e))
        except Exception as e:  # a bug: recorded on the job, the server carries on
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", error=f"internal error: {type(e).__name__}: {e}")
        finally:
            self._tasks.pop(job.id, None)
            self._done.pop(job.id).set()  # later waits read the store

    def _finish(self, job: Job, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        now = time.time()
        self.store.update(job, state=state, finished=now, result=result or job.result, error=error,
                          started=job.started or now)  # fmt: skip
        if self.durations is not None:
            self.durations.labels(job.kind, state).observe(now - (job.started or now))
        why = f": {error.splitlines()[0]}" if error else ""
        log.info("%s job %s (%s) %s%s", job.kind, job.id, job.name, state, why)

    def _running(self, job: Job, **changes: Any) -> None:
        self.store.update(job, state="running", started=time.time(), **changes)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        ev = self._done.get(job_id)
        if ev is not None:
            await asyncio.wait_for(ev.wait(), timeout)
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def cancel(self, job_id: str) -> bool:
        task = self._tasks.get(job_id)
        if task is None:
            return False
        for child in self.store.list(parent=job_id):
            self.cancel(child.id)
        task.cancel()
        return True

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self.model_server is not None:
            await self.model_server.close()
        self.store.close()

    # -- restarts -------------------------------------------------------------------
    def recover(self, resume: bool | None = None) -> None:
        """Jobs a stopped process left queued or running: top-level training jobs that
        checkpointed (and did not opt out) start again from their last checkpoint; the
        rest are marked failed. Call with the event loop running."""
        resume = self.settings.resume if resume is None else resume
        keep = []
        for job in self.store.interrupted():
            if resume and job.kind == "training" and job.parent is None and job.spec.get("resume", True):
                checkpoint = latest_checkpoint(self.job_dir(job.id))
                if checkpoint is not None:
                    keep.append(job)
                    self._resume_training(job, checkpoint)
        self.resumed = [j.id for j in keep]
        self.interrupted = self.store.fail_interrupted(exclude={j.id for j in keep})
        if self.interrupted:
            log.warning("marked %d job(s) failed: the process stopped while they ran", len(self.interrupted))
        for job in keep:
            log.info("training job %s (%s) resumes from %s", job.id, job.name, job.result.get("resumed_from"))

    def _resume_training(self, job: Job, checkpoint: Path) -> None:
        spec = TrainingSpec.model_validate(job.spec)
        self.store.update(job, state="queued", result={**job.result, "resumed_from": checkpoint.name},
                          error=None)  # fmt: skip
        self._start(job, self._training_work(spec, self.job_dir(job.id), "training", resume_from=checkpoint))

    # -- training -----------------------------------------------------------------
    def submit_training(self, spec: TrainingSpec, parent: str | None = None, kind: str = "training") -> Job:
        job = self.store.create(kind, spec.name, spec.model_dump(), parent)
        job_dir = self.job_dir(job.id)
        self.store.update(job, log_path=str(job_dir / "job.log"))
        return self._start(job, self._training_work(spec, job_dir, kind))

    def _training_work(self, spec: TrainingSpec, job_dir: Path, kind: str,
                       resume_from: Path | None = None) -> Callable[[Job], Awaitable[dict[str, Any]]]:  # fmt: skip
        async def work(job: Job) -> dict[str, Any]:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.settings.max_running_trainings)
            async with self._slots:
                self._running(job)
                result = await run_training(spec, job_dir, resume_from)
            if resume_from is not None:
                result["resumed_from"] = resume_from.name
            self.store.update(job, metrics=result["metrics"])
            if spec.model is not None:
                why = check_model(Path(result["output_dir"]))
                if why:
                    raise JobFailed(f"no model: {why}; the mesh is unchanged")
                if spec.model.serve and kind == "training":
                    result["model_path"] = str(await self.register_model(spec.model.name, Path(result["output_dir"])))
                    result["model"] = spec.model.name
            return result

        return work

    async def register_model(self, name: str, output: Path) -> Path:
        """Place a trained model in the model folder under ``name`` and (re)load it."""
        doc = orjson.loads((output / "model-settings.json").read_bytes())
        self.model_dir.mkdir(parents=True, exist_ok=True)
        final = self.model_dir / name
        if final.exists() and not (final / MARKER).exists():
            raise JobFailed(f"model folder {final} exists and was not made by a training job: left alone")
        staging = self.model_dir / f".{name}.new"
        old = self.model_dir / f".{name}.old"
        for p in (staging, old):
            shutil.rmtree(p, ignore_errors=True)
        await asyncio.to_thread(shutil.copytree, output, staging)
        (staging / MARKER).write_text(f"{name}\n")
        doc["name"] = name
        (staging / "model-settings.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if self.registrar is not None:
            config = {**doc, "uri": str(final.resolve())}
            try:
                await self.registrar(name, final, config)
            except Exception as e:
                message = getattr(e, "message", None) or str(e)
                raise JobFailed(f"model {name!r} was saved to {final} but did not load: {message}") from None
        return final

    # -- tuning and workflows -----------------------------------------------------
    def submit_experiment(self, spec: ExperimentSpec, parent: str | None = None) -> Job:
        from meshserve.adapters.tuning import run_experiment

        job = self.store.create("tuning", spec.name, spec.model_dump(by_alias=True), parent)

        async def work(job: Job) -> dict[str, Any]:
            self._running(job)
            return await run_experiment(self, job, spec)

        return self._start(job, work)

    def submit_workflow(self, spec: WorkflowSpec, parent: str | None = None, env: dict[str, str] | None = None) -> Job:
        from meshserve.adapters.workflows import run_workflow

        job = self.store.create("workflow", spec.name, spec.model_dump(by_alias=True), parent)
        job_dir = self.job_dir(job.id)
        self.store.update(job, log_path=str(job_dir / "steps"))

        async def work(job: Job) -> dict[str, Any]:
            self._running(job)
            return await run_workflow(self, job, spec, job_dir, env or {})

        return self._start(job, work)
