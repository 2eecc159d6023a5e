"""Specs for the adapters: training jobs, Katib-shaped experiments, workflows, triggers."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$"  # a Kubernetes (DNS-1123) label
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    """Training data: files split across workers.

    ``shard: file`` gives rank r the files i with i % workers == r (needs at least one
    file per worker); ``row`` gives every worker every file and rank r its rows
    i % workers == r (DistributedSampler's split without shuffling).
    """

    files: list[str] = []
    shard: Literal["file", "row"] = "file"


class ModelOutput(Strict):
    name: str = Field(pattern=MODEL_NAME)
    serve: bool = True  # register it in the mesh on success


class KubeflowSpec(Strict):
    """Which Kubeflow API a training job renders to: the Training Operator's ``PyTorchJob``
    (kubeflow.org/v1) or Trainer v2's ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the
    named ClusterTrainingRuntime."""

    api: Literal["PyTorchJob", "TrainJob"] = "PyTorchJob"
    runtime: str = Field(default="torch-distributed", pattern=NAME)


class TrainingSpec(Strict):
    """One distributed training job.

    ``entrypoint``: ``package.module:function`` (called in every worker) or a script
    path ending in ``.py``; with ``image`` and no entrypoint the image's own command
    runs (scaled out only).
    """

    name: str = Field(default="train", pattern=NAME)
    entrypoint: str | None = None
    image: str | None = None
    command: list[str] | None = None
    workers: int = Field(default=2, ge=1, le=64)
    data: DataSpec = DataSpec()
    hyperparameters: dict[str, Any] = {}
    model: ModelOutput | None = None
    env: dict[str, str] = {}
    timeout_seconds: float = Field(default=3600, gt=0)
    target: Literal["local", "kubernetes"] = "local"
    # Interrupted by a restart, the job starts again from its last checkpoint (if it saved one).
    resume: bool = True
    kubeflow: KubeflowSpec = KubeflowSpec()
    # pytorch: torchrun's environment, a PyTorchJob/TrainJob; tensorflow: TF_CONFIG per
    # worker (MultiWorkerMirroredStrategy), a TFJob.
    framework: Literal["pytorch", "tensorflow"] = "pytorch"

    @field_validator("entrypoint")
    @classmethod
    def _entry(cls, v: str | None) -> str | None:
        if v is not None and not (v.endswith(".py") or ENTRY.match(v)):
            raise ValueError("must be 'package.module:function' or a path to a .py script")
        return v

    @model_validator(mode="after")
    def _runnable(self) -> TrainingSpec:
        if self.entrypoint is None and self.image is None:
            raise ValueError("give an 'entrypoint' (module:function or script.py) or an 'image'")
        if self.target == "local" and self.entrypoint is None:
            raise ValueError("'entrypoint' is required to run locally (an image runs only on kubernetes)")
        if self.framework == "tensorflow" and self.kubeflow.api == "TrainJob":
            raise ValueError("kubeflow.api: Trainer v2 has no TensorFlow runtime; a tensorflow job renders a TFJob")
        if self.data.shard == "file" and self.data.files and len(self.data.files) < self.workers:
            raise ValueError(f"data.files: {len(self.data.files)} file(s) cannot feed {self.workers} workers by file")
        return self


# -- tuning (Katib's Experiment, v1beta1 field names) --------------------------------


class Objective(Strict):
    type: Literal["maximize", "minimize"]
    goal: float | None = None
    objectiveMetricName: str = Field(min_length=1)  # noqa: N815 - Katib's field names
    additionalMetricNames: list[str] = []  # noqa: N815


class Algorithm(Strict):
    algorithmName: Literal["random", "tpe", "grid"] = "random"  # noqa: N815
    algorithmSettings: list[dict[str, str]] = []  # noqa: N815


class FeasibleSpace(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    min: str | float | int | None = None
    max: str | float | int | None = None
    step: str | float | int | None = None
    list_: list[str] | None = Field(default=None, alias="list")


class Parameter(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][\w\-]*$")
    parameterType: Literal["int", "double", "categorical"]  # noqa: N815
    feasibleSpace: FeasibleSpace  # noqa: N815

    @model_validator(mode="after")
    def _space(self) -> Parameter:
        fs = self.feasibleSpace
        if self.parameterType == "categorical":
            if not fs.list_:
                raise ValueError("feasibleSpace.list is required for a categorical parameter")
        else:
            if fs.min is None or fs.max is None:
                raise ValueError("feasibleSpace.min and max are required for int and double parameters")
            try:
                lo, hi = float(fs.min), float(fs.max)
                step = float(fs.step) if fs.step is not None else None
            except ValueError:
                raise ValueError("feasibleSpace min/max/step must be numbers") from None
            if lo > hi:
                raise ValueError("feasibleSpace.min must not exceed max")
            if step is not None and step <= 0:
                raise ValueError("feasibleSpace.step must be positive")
            if self.parameterType == "int" and (lo != int(lo) or hi != int(hi)):
                raise ValueError("feasibleSpace min/max of an int parameter must be integers")
        return self


class TrialParameter(Strict):
    name: str = Field(pattern=r"^[A-Za-z_]\w*$")
    reference: str
    description: str = ""


class TrialTemplate(Strict):
    trialParameters: list[TrialParameter]  # noqa: N815
    # A training spec whose strings may hold ${trialParameters.NAME}.
    trialSpec: dict[str, Any]  # noqa: N815
    primaryContainerName: str = "pytorch"  # noqa: N815


class ExperimentSpec(Strict):
    name: str = Field(default="tune", pattern=NAME)
    objective: Objective
    algorithm: Algorithm = Algorithm()
    parameters: list[Parameter] = Field(min_length=1)
    maxTrialCount: int = Field(default=4, ge=1, le=1000)  # noqa: N815
    parallelTrialCount: int = Field(default=1, ge=1, le=64)  # noqa: N815
    maxFailedTrialCount: int = Field(default=0, ge=0)  # noqa: N815
    trialTemplate: TrialTemplate  # noqa: N815
    # The best trial's model is registered under this name (default: the template's).
    modelName: str | None = Field(default=None, pattern=MODEL_NAME)  # noqa: N815
    target: Literal["local", "kubernetes"] = "local"

    @model_validator(mode="after")
    def _references(self) -> ExperimentSpec:
        names = {p.name for p in self.parameters}
        for tp in self.trialTemplate.trialParameters:
            if tp.reference not in names:
                raise ValueError(
                    f"trialTemplate.trialParameters: {tp.name!r} references unknown parameter {tp.reference!r}"
                )
        if self.algorithm.algorithmName == "grid":
            for p in self.parameters:
                if p.parameterType == "double" and p.feasibleSpace.step is None:
                    raise ValueError(f"parameters: grid search needs feasibleSpace.step for double {p.name!r}")
        return self


# -- workflows --------------------------------------------------------------------

STEP_KINDS = ("command", "ingest", "check-freshness", "train", "tune", "evaluate", "package", "deploy")
IMAGE = re.compile(r"^oci://[^/@\s]+/[^@\s]+$")  # oci://registry/repository[:tag], no digest
PINNED = re.compile(r"^oci://[^/@\s]+/[^@\s]+@sha256:[0-9a-f]{64}$")
RESULT = re.compile(r"^\{\{tasks\.(?P<step>[a-z0-9][a-z0-9\-]*)\.outputs\.result\}\}$")
WHEN = re.compile(r"^\s*(?P<left>\S+)\s*(?P<op>==|!=)\s*(?P<right>\S+)\s*$")


class Freshness(Strict):
    store: str | None = None  # default: the adapters' cache_store setting
    window_seconds: float = Field(default=3600, ge=0)


class StepSpec(Strict):
    name: str = Field(pattern=NAME)
    kind: Literal["command", "ingest", "check-freshness", "train", "tune", "evaluate", "package", "deploy"] = "command"
    command: list[str] | None = None
    depends: list[str] = []
    # Argo's form: "{{tasks.check.outputs.result}} == stale"
    when: str | None = None
    retries: int = Field(default=0, ge=0, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0)
    timeout_seconds: float = Field(default=3600, gt=0)
    env: dict[str, str] = {}
    freshness: Freshness | None = None
    train: TrainingSpec | None = None
    tune: ExperimentSpec | None = None
    model: str | None = Field(default=None, pattern=MODEL_NAME)  # package, deploy: the model
    # package: push the model as a modelcar to this oci://registry/repository[:tag] (default
    # tag: the workflow job's id); the step's result is its oci://...@sha256: reference.
    image: str | None = None
    # deploy: load the model from this oci://...@sha256: reference, or a package step's
    # result ("{{tasks.NAME.outputs.result}}"); without it, reload the model's folder.
    uri: str | None = None
    # deploy, rendered: the KServe modelFormat of the InferenceService (meshserve's runtime serves it).
    model_format: str = Field(default="pytorch", pattern=r"^[a-z0-9][a-z0-9\-]*$")

    @field_validator("when")
    @classmethod
    def _when(cls, v: str | None) -> str | None:
        if v is not None and not WHEN.match(v):
            raise ValueError("must read 'LEFT == RIGHT' or 'LEFT != RIGHT'")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and not IMAGE.match(v):
            raise ValueError("must read oci://registry/repository[:tag] (the digest comes from the push)")
        return v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not (PINNED.match(v) or RESULT.match(v)):
            raise ValueError("must be oci://registry/repository@sha256:<digest> or {{tasks.NAME.outputs.result}}")
        return v

    @model_validator(mode="after")
    def _fields_for_kind(self) -> StepSpec:
        need = {"command": "command", "evaluate": "command", "train": "train", "tune": "tune", "deploy": "model",
                "package": "model"}  # fmt: skip
        field = need.get(self.kind)
        if field and getattr(self, field) is None:
            raise ValueError(f"a {self.kind!r} step needs '{field}'")
        if self.kind == "package" and self.image is None:
            raise ValueError("a 'package' step needs 'image' (oci://registry/repository[:tag])")
        if self.image is not None and self.kind != "package":
            raise ValueError("'image' belongs to a 'package' step")
        if self.uri is not None and self.kind != "deploy":
            raise ValueError("'uri' belongs to a 'deploy' step")
        if self.kind == "ingest" and self.command is None:
            raise ValueError("an 'ingest' step needs 'command'")
        return self


class WorkflowSpec(Strict):
    name: str = Field(default="pipeline", pattern=NAME)
    steps: list[StepSpec] = Field(min_length=1)
    target: Literal["local", "kubernetes"] = "local"

    @model_validator(mode="after")
    def _dag(self) -> WorkflowSpec:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError("steps: step names must be unique")
        known = set(names)
        for s in self.steps:
            for d in s.depends:
                if d not in known:
                    raise ValueError(f"steps.{s.name}.depends: unknown step {d!r}")
            ref = RESULT.match(s.uri or "")
            if ref and ref["step"] not in s.depends:
                raise ValueError(f"steps.{s.name}.uri: the step must depend on {ref['step']!r}, whose result it uses")
        order(self)  # raises on a cycle
        return self


def order(wf: WorkflowSpec) -> list[StepSpec]:
    """Steps in dependency order (Kahn); ValueError on a cycle."""
    by_name = {s.name: s for s in wf.steps}
    indeg = {s.name: len(set(s.depends)) for s in wf.steps}
    out: list[StepSpec] = []
    ready = [n for n, d in indeg.items() if d == 0]
    while ready:
        n = ready.pop(0)
        out.append(by_name[n])
        for s in wf.steps:
            if n in s.depends:
                indeg[s.name] -= 1
                if indeg[s.name] == 0:
                    ready.append(s.name)
    if len(out) != len(wf.steps):
        raise ValueError("steps: the dependencies form a cycle")
    return out


# -- events --------------------------------------------------------------------------


class TriggerSpec(Strict):
    """A GitHub push on ``repository`` (owner/name) to one of ``branches`` runs ``workflow``."""

    name: str = Field(pattern=NAME)
    repository: str = Field(pattern=r"^[\w.\-]+/[\w.\-]+$")
    branches: list[str] = ["main"]
    workflow: WorkflowSpec
