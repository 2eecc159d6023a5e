"""The embedded tuning engine: Optuna trials run as real training jobs.

The experiment is Katib's (objective, search space, algorithm, trial budget, trial
template). Trials are asked of an Optuna study and told their objective, read from
the metrics the trial's workers reported; up to parallelTrialCount run at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from meshserve.adapters.errors import parse
from meshserve.adapters.specs import ExperimentSpec, Parameter, TrainingSpec
from meshserve.adapters.store import Job

PLACEHOLDER = re.compile(r"\$\{trialParameters\.([A-Za-z_]\w*)\}")


def _num(v: Any) -> float:
    return float(v)


def distributions(spec: ExperimentSpec) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for p in spec.parameters:
        fs = p.feasibleSpace
        if p.parameterType == "categorical":
            out[p.name] = od.CategoricalDistribution(list(fs.list_ or []))
        elif p.parameterType == "int":
            out[p.name] = od.IntDistribution(int(_num(fs.min)), int(_num(fs.max)),
                                             step=int(_num(fs.step)) if fs.step is not None else 1)  # fmt: skip
        else:
            step = _num(fs.step) if fs.step is not None else None
            out[p.name] = od.FloatDistribution(_num(fs.min), _num(fs.max), step=step)
    return out


def grid_space(p: Parameter) -> list[Any]:
    fs = p.feasibleSpace
    if p.parameterType == "categorical":
        return list(fs.list_ or [])
    lo, hi = _num(fs.min), _num(fs.max)
    step = _num(fs.step) if fs.step is not None else 1.0
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    values = [lo + i * step for i in range(n)]
    return [int(v) for v in values] if p.parameterType == "int" else [round(v, 12) for v in values]


def sampler(spec: ExperimentSpec) -> Any:
    import optuna

    settings = {s.get("name"): s.get("value") for s in spec.algorithm.algorithmSettings}
    seed = int(settings["random_state"]) if settings.get("random_state") is not None else None
    name = spec.algorithm.algorithmName
    if name == "grid":
        return optuna.samplers.GridSampler({p.name: grid_space(p) for p in spec.parameters}, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(settings.get("n_startup_trials") or 2))
    return optuna.samplers.RandomSampler(seed=seed)


def substitute(template: Any, values: dict[str, Any]) -> Any:
    """The template with ``${trialParameters.NAME}`` replaced: a string that is one
    placeholder takes the value's type, others get its text."""
    if isinstance(template, dict):
        return {k: substitute(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [substitute(v, values) for v in template]
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            return values[whole[1]]
        return PLACEHOLDER.sub(lambda m: str(values[m[1]]), template)
    return template


def sample_values(spec: ExperimentSpec) -> dict[str, Any]:
    """Each trial parameter at a value of its space (its minimum or first choice)."""
    firsts = {}
    for p in spec.parameters:
        fs = p.feasibleSpace
        if p.parameterType == "categorical":
            firsts[p.name] = (fs.list_ or [""])[0]
        else:
            firsts[p.name] = int(_num(fs.min)) if p.parameterType == "int" else _num(fs.min)
    return {tp.name: firsts[tp.reference] for tp in spec.trialTemplate.trialParameters}


def trial_spec(spec: ExperimentSpec, params: dict[str, Any], index: int) -> TrainingSpec:
    values = {tp.name: params[tp.reference] for tp in spec.trialTemplate.trialParameters}
    doc = substitute(spec.trialTemplate.trialSpec, values)
    doc["name"] = f"{spec.name}-trial-{index}"[:63].rstrip("-")
    return parse(TrainingSpec, doc, "trialTemplate.trialSpec")


async def run_experiment(manager: Any, job: Job, spec: ExperimentSpec) -> dict[str, Any]:
    import optuna
    from meshserve.adapters.manager import JobFailed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = "maximize" if spec.objective.type == "maximize" else "minimize"
    study = optuna.create_study(direction=direction, sampler=sampler(spec))
    dists = distributions(spec)
    metric = spec.objective.objectiveMetricName
    template_model = (spec.trialTemplate.trialSpec.get("model") or {}).get("name")
    model_name = spec.modelName or template_model
    trials: list[dict[str, Any]] = []
    failed = 0
    launched = 0
    budget = spec.maxTrialCount
    if spec.algorithm.algorithmName == "grid":
        size = 1
        for p in spec.parameters:
            size *= len(grid_space(p))
        budget = min(budget, size)
    stop = asyncio.Event()

    def goal_reached() -> bool:
        goal = spec.objective.goal
        if goal is None or not any(t["state"] == "succeeded" for t in trials):
            return False
        best = study.best_value
        return best >= goal if direction == "maximize" else best <= goal

    async def one(index: int) -> None:
        nonlocal failed
        trial = study.ask(dists)
        record: dict[str, Any] = {"index": index, "params": dict(trial.params), "state": "running"}
        trials.append(record)
        try:
            tspec = trial_spec(spec, trial.params, index)
            tjob = manager.submit_training(tspec, parent=job.id, kind="trial")
            record["job"] = tjob.id
            done = await manager.wait(tjob.id)
            value = done.metrics.get(metric)
            if done.state != "succeeded":
                raise JobFailed(done.error or "trial failed")
            if value is None:
                raise JobFailed(f"trial reported no {metric!r} metric")
            study.tell(trial, float(value))
            record.update(state="succeeded", value=float(value), metrics=done.metrics,
                          output_dir=done.result.get("output_dir"))  # fmt: skip
        except Exception as e:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            record.update(state="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            failed += 1
            if failed > spec.maxFailedTrialCount:
                stop.set()
        manager.store.update(job, metrics={"trials": len(trials), "failed_trials": failed})
        if goal_reached():
            stop.set()

    running: set[asyncio.Task] = set()
    while launched < budget and not stop.is_set():
        while len(running) < spec.parallelTrialCount and launched < budget and not stop.is_set():
            running.add(asyncio.ensure_future(one(launched)))
            launched += 1
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    if running:
        await asyncio.wait(running)
    ok = [t for t in trials if t["state"] == "succeeded"]
    result: dict[str, Any] = {"trials": sorted(trials, key=lambda t: t["index"])}
    if failed > spec.maxFailedTrialCount:
        manager.store.update(job, result=result)
        raise JobFailed(f"{failed} trial(s) failed, more than maxFailedTrialCount={spec.maxFailedTrialCount}")
    if not ok:
        raise JobFailed("no trial succeeded")
    best = min(ok, key=lambda t: t["value"]) if direction == "minimize" else max(ok, key=lambda t: t["value"])
    result["best"] = {"index": best["index"], "params": best["params"], metric: best["value"], "job": best["job"]}
    result["goal_reached"] = goal_reached()
    manager.store.update(job, metrics={"trials": len(trials), "failed_trials": failed, metric: best["value"]})
    if model_name and best.get("output_dir"):
        from pathlib import Path

        from meshserve.adapters.training import check_model

        why = check_model(Path(best["output_dir"]))
        if why:
            raise JobFailed(f"the best trial has no model: {why}; the mesh is unchanged")
        result["model"] = model_name
        result["model_path"] = str(await manager.register_model(model_name, Path(best["output_dir"])))
    json.dumps(result)  # the store keeps it as JSON
    return result
