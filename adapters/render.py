"""The scaled-out forms of the adapters' specs, as Kubernetes resources (plain dicts):
Kubeflow PyTorchJob or TFJob (kubeflow.org/v1) or TrainJob (trainer.kubeflow.org/v1alpha1), Katib
Experiment (kubeflow.org/v1beta1), Argo Workflow, Argo Events EventSource and Sensor
(argoproj.io/v1alpha1), the RBAC the Sensor needs to submit workflows, and KServe
InferenceServices of packaged modelcars."""

from __future__ import annotations

import copy
import json
import shlex
from typing import Any

import yaml
from meshserve.adapters.settings import AdaptersSettings
from meshserve.adapters.specs import ExperimentSpec, StepSpec, TrainingSpec, TriggerSpec, WorkflowSpec

MANAGED = {"app.kubernetes.io/managed-by": "meshserve"}
MODELS_MOUNT = "/mnt/models"
MODELS_PVC = "meshserve-models"
EVENT_PORT = 12000


def _meta(name: str, settings: AdaptersSettings, generate: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": settings.namespace, "labels": dict(MANAGED)}
    meta["generateName" if generate else "name"] = f"{name}-" if generate else name
    return meta


def _container_command(spec: TrainingSpec) -> list[str]:
    if spec.command:
        return list(spec.command)
    if spec.entrypoint:
        return ["python", "-m", "meshserve.adapters.worker", spec.entrypoint]
    return []


def training_pod_template(spec: TrainingSpec, settings: AdaptersSettings, spec_json: str | None = None,
                          container_name: str = "pytorch") -> dict:  # fmt: skip
    env = [{"name": "MESHSERVE_TRAIN_SPEC_JSON", "value": spec_json or spec.model_dump_json()}]
    if spec.model is not None:
        env.append({"name": "MESHSERVE_OUTPUT_DIR", "value": f"{MODELS_MOUNT}/{spec.model.name}"})
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    container: dict[str, Any] = {
        "name": container_name,
        "image": spec.image or settings.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
    }
    command = _container_command(spec)
    if command:
        container["command"] = command
    return {
        "metadata": {"labels": dict(MANAGED)},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC}}],
        },
    }


def pytorchjob(spec: TrainingSpec, settings: AdaptersSettings, spec_json: str | None = None) -> dict[str, Any]:
    """A Kubeflow Training Operator PyTorchJob: one Master and workers-1 Workers; the
    operator sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE as the local launcher does."""
    template = training_pod_template(spec, settings, spec_json)
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if spec.workers > 1:
        worker = copy.deepcopy(template)
        replicas["Worker"] = {"replicas": spec.workers - 1, "restartPolicy": "OnFailure", "template": worker}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(spec.name, settings),
        "spec": {
            "runPolicy": {
                "cleanPodPolicy": "None",
                "backoffLimit": 0,
                "activeDeadlineSeconds": int(spec.timeout_seconds),
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def tfjob(spec: TrainingSpec, settings: AdaptersSettings, spec_json: str | None = None) -> dict[str, Any]:
    """A Kubeflow Training Operator TFJob: ``workers`` Worker replicas (worker 0 is the
    chief under MultiWorkerMirroredStrategy); the operator sets TF_CONFIG as the local
    launcher does. Its container must be named ``tensorflow``."""
    template = training_pod_template(spec, settings, spec_json, container_name="tensorflow")
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": _meta(spec.name, settings),
        "spec": {
            "runPolicy": {
                "cleanPodPolicy": "None",
                "backoffLimit": 0,
                "activeDeadlineSeconds": int(spec.timeout_seconds),
            },
            "tfReplicaSpecs": {
                "Worker": {"replicas": spec.workers, "restartPolicy": "OnFailure", "template": template}
            },  # fmt: skip
        },
    }


TRAINJOB_NODE = "node"  # the replicated job and container name of Trainer's torch runtimes


def trainjob(spec: TrainingSpec, settings: AdaptersSettings) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on a ClusterTrainingRuntime (``torch-distributed``):
    ``workers`` nodes of one process each; torchrun reads the PET_* variables the
    runtime sets and gives each worker the RANK/WORLD_SIZE/MASTER_* the local launcher
    does. The models volume is added with a runtime patch."""
    pod = training_pod_template(spec, settings)["spec"]
    container = pod["containers"][0]
    command = list(spec.command) if spec.command else []
    if not command and spec.entrypoint:
        command = ["torchrun", "--module", "meshserve.adapters.worker", spec.entrypoint]
    trainer: dict[str, Any] = {"image": container["image"], "numNodes": spec.workers, "numProcPerNode": 1,
                               "env": container["env"]}  # fmt: skip
    if command:
        trainer["command"] = command
    patch = {"template": {"spec": {"template": {"spec": {
        "volumes": pod["volumes"],
        "containers": [{"name": TRAINJOB_NODE, "volumeMounts": container["volumeMounts"]}],
    }}}}}  # fmt: skip
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _meta(spec.name, settings),
        "spec": {
            "runtimeRef": {
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
                "name": spec.kubeflow.runtime,
            },  # fmt: skip
            "activeDeadlineSeconds": int(spec.timeout_seconds),
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": "meshserve.io/adapters",
                    "trainingRuntimeSpec": {
                        "template": {"spec": {"replicatedJobs": [{"name": TRAINJOB_NODE, **patch}]}}
                    },
                }
            ],  # fmt: skip
        },
    }


def training_job(spec: TrainingSpec, settings: AdaptersSettings) -> dict[str, Any]:
    """The spec's Kubeflow resource: a TFJob for tensorflow; a PyTorchJob, or a TrainJob when
    ``kubeflow.api`` says so, for pytorch."""
    if spec.framework == "tensorflow":
        return tfjob(spec, settings)
    return trainjob(spec, settings) if spec.kubeflow.api == "TrainJob" else pytorchjob(spec, settings)


def _feasible(p: Any) -> dict[str, Any]:
    fs = p.feasibleSpace
    if p.parameterType == "categorical":
        return {"list": [str(v) for v in fs.list_ or []]}
    out = {"min": str(fs.min), "max": str(fs.max)}
    if fs.step is not None:
        out["step"] = str(fs.step)
    return out


def katib_experiment(spec: ExperimentSpec, settings: AdaptersSettings) -> dict[str, Any]:
    """A Katib Experiment whose trials are PyTorchJobs; metrics come from the trial's
    stdout (the workers' ``name=value`` lines, Katib's StdOut collector format)."""
    doc = dict(spec.trialTemplate.trialSpec)
    doc.setdefault("name", spec.name)
    doc["target"] = "kubernetes"
    # The template's placeholders survive as text in the pod (Katib substitutes them per
    # trial); the pod's shape comes from the template with sample values.
    from meshserve.adapters.tuning import sample_values, substitute

    sample = TrainingSpec.model_validate(substitute(doc, sample_values(spec)))
    kubeflow_job = tfjob if sample.framework == "tensorflow" else pytorchjob
    job = kubeflow_job(sample, settings, spec_json=json.dumps(doc, separators=(",", ":")))
    job["metadata"] = {"labels": dict(MANAGED)}
    objective: dict[str, Any] = {"type": spec.objective.type, "objectiveMetricName": spec.objective.objectiveMetricName}
    if spec.objective.goal is not None:
        objective["goal"] = spec.objective.goal
    if spec.objective.additionalMetricNames:
        objective["additionalMetricNames"] = list(spec.objective.additionalMetricNames)
    algorithm: dict[str, Any] = {"algorithmName": spec.algorithm.algorithmName}
    if spec.algorithm.algorithmSettings:
        algorithm["algorithmSettings"] = spec.algorithm.algorithmSettings
    return {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "Experiment",
        "metadata": _meta(spec.name, settings),
        "spec": {
            "objective": objective,
            "algorithm": algorithm,
            "parallelTrialCount": spec.parallelTrialCount,
            "maxTrialCount": spec.maxTrialCount,
            "maxFailedTrialCount": spec.maxFailedTrialCount,
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
            "parameters": [
                {"name": p.name, "parameterType": p.parameterType, "feasibleSpace": _feasible(p)}
                for p in spec.parameters
            ],
            "trialTemplate": {
                # A TFJob's container is named tensorflow (the template's default names pytorch's).
                "primaryContainerName": "tensorflow"
                if sample.framework == "tensorflow" and spec.trialTemplate.primaryContainerName == "pytorch"
                else spec.trialTemplate.primaryContainerName,
                "successCondition": 'status.conditions.#(type=="Succeeded")#|#(status=="True")#',
                "failureCondition": 'status.conditions.#(type=="Failed")#|#(status=="True")#',
                "trialParameters": [
                    {
                        "name": t.name,
                        "reference": t.reference,
                        **({"description": t.description} if t.description else {}),
                    }
                    for t in spec.trialTemplate.trialParameters
                ],
                "trialSpec": job,
            },
        },
    }


def _create_resource(manifest: dict[str, Any], name: str, success: str, failure: str) -> dict[str, Any]:
    """An Argo resource template that creates ``manifest`` (a fresh name each run) and waits on it."""
    manifest["metadata"] = {"generateName": f"{name}-", "labels": dict(MANAGED)}
    return {
        "action": "create",
        "manifest": yaml.safe_dump(manifest, sort_keys=False),
        "successCondition": success,
        "failureCondition": failure,
    }


def _step_template(step: StepSpec, settings: AdaptersSettings, cache_store: str | None) -> dict[str, Any]:
    name = step.name
    t: dict[str, Any] = {"name": name, "activeDeadlineSeconds": int(step.timeout_seconds)}
    if step.retries:
        t["retryStrategy"] = {
            "limit": str(step.retries),
            "retryPolicy": "Always",
            "backoff": {"duration": f"{step.backoff_seconds:g}s", "factor": "2"},
        }
    # The push that triggered the run, as the local runner passes it (the Sensor sets the parameter).
    env = [{"name": "MESHSERVE_EVENT_SHA", "value": "{{workflow.parameters.revision}}"}]
    env += [{"name": k, "value": v} for k, v in sorted(step.env.items())]

    def container(command: list[str]) -> dict[str, Any]:
        return {"image": settings.image, "command": command, "env": env}

    store = (step.freshness.store if step.freshness else None) or cache_store
    if step.kind in ("command", "evaluate"):
        t["container"] = container(list(step.command or []))
    elif step.kind == "ingest":
        cmd = list(step.command or [])
        if store:  # the data is fresh once ingestion succeeded
            touch = ["python", "-m", "meshserve.adapters.steps", "touch", "--store", store]
            script = shlex.join(cmd) + " && " + shlex.join(touch)
            cmd = ["sh", "-c", script]
        t["container"] = container(cmd)
    elif step.kind == "check-freshness":
        window = step.freshness.window_seconds if step.freshness else 3600
        t["container"] = container(["python", "-m", "meshserve.adapters.steps", "check-freshness",
                                    "--store", str(store), "--window-seconds", f"{window:g}"])  # fmt: skip
    elif step.kind == "train" and step.train is not None and step.train.kubeflow.api == "TrainJob":
        t["resource"] = _create_resource(
            trainjob(step.train, settings),
            step.train.name,
            success='status.conditions.#(type=="Complete").status == True',
            failure='status.conditions.#(type=="Failed").status == True',
        )
    elif step.kind == "train" and step.train is not None and step.train.framework == "tensorflow":
        t["resource"] = _create_resource(
            tfjob(step.train, settings),
            step.train.name,
            success="status.replicaStatuses.Worker.succeeded > 0",
            failure="status.replicaStatuses.Worker.failed > 0",
        )
    elif step.kind == "train":
        assert step.train is not None
        t["resource"] = _create_resource(
            pytorchjob(step.train, settings),
            step.train.name,
            success="status.replicaStatuses.Master.succeeded > 0",
            failure="status.replicaStatuses.Master.failed > 0",
        )
    elif step.kind == "tune":
        assert step.tune is not None
        t["resource"] = _create_resource(
            katib_experiment(step.tune, settings),
            step.tune.name,
            success="status.trialsSucceeded > 0",
            failure="status.trialsFailed > " + str(step.tune.maxFailedTrialCount),
        )
    elif step.kind == "package":  # the model on the shared volume, pushed; stdout: its digest reference
        image = step.image if ":" in str(step.image).rsplit("/", 1)[-1] else f"{step.image}:{{{{workflow.name}}}}"
        cmd = ["meshserve", "modelcar", "build", f"{MODELS_MOUNT}/{step.model}", "--tag", str(image),
               "--kserve-compat", "--quiet", *(["--insecure"] if settings.registry_insecure else [])]  # fmt: skip
        t["container"] = {**container(cmd), "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}]}
    elif step.kind == "deploy" and step.uri is not None:  # by digest: a KServe InferenceService
        manifest = inference_service(str(step.model), step.uri, step.model_format, settings)
        manifest["metadata"].pop("namespace")
        t["resource"] = {
            "action": "apply",
            "manifest": yaml.safe_dump(manifest, sort_keys=False),
            "successCondition": "status.modelStatus.states.activeModelState == Loaded",
            "failureCondition": "status.modelStatus.states.activeModelState == FailedToLoad",
        }
    elif step.kind == "deploy":
        t["container"] = container(["python", "-m", "meshserve.adapters.steps", "deploy", "--server",
                                    settings.server_url, "--model", str(step.model)])  # fmt: skip
    return t


def kube_name(model: str) -> str:
    """A model name as a DNS-1123 label (an InferenceService's name)."""
    name = "".join(c if c.isalnum() else "-" for c in model.lower()).strip("-")[:63].strip("-")
    return name or "model"


def inference_service(model: str, uri: str, model_format: str, settings: AdaptersSettings) -> dict[str, Any]:
    """A KServe InferenceService that serves the modelcar ``uri`` (oci://...@sha256:) with
    meshserve's ServingRuntime (deploy/kserve): KServe mounts the image's /models."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": _meta(kube_name(model), settings),
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": model_format},
                    "runtime": "meshserve",
                    "protocolVersion": "v2",
                    "storageUri": uri,
                }
            }
        },
    }


def argo_workflow(spec: WorkflowSpec, settings: AdaptersSettings) -> dict[str, Any]:
    """An Argo Workflow with one DAG template; each step is its own template."""
    tasks = []
    for s in spec.steps:
        task: dict[str, Any] = {"name": s.name, "template": s.name}
        if s.depends:
            task["dependencies"] = list(s.depends)
        if s.when:
            task["when"] = s.when
        tasks.append(task)
    wf = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": _meta(spec.name, settings, generate=True),
        "spec": {
            "entrypoint": "main",
            "serviceAccountName": settings.service_account,
            "arguments": {"parameters": [{"name": "revision", "value": "HEAD"}]},
            "templates": [{"name": "main", "dag": {"tasks": tasks}},
                          *(_step_template(s, settings, settings.cache_store) for s in spec.steps)],
        },
    }  # fmt: skip
    if any(s.kind == "package" for s in spec.steps):  # it reads the trained model from the shared volume
        wf["spec"]["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC}}]
    return wf


def event_source(trigger: TriggerSpec, settings: AdaptersSettings) -> dict[str, Any]:
    owner, repo = trigger.repository.split("/", 1)
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "EventSource",
        "metadata": _meta(trigger.name, settings),
        "spec": {
            "service": {"ports": [{"port": EVENT_PORT, "targetPort": EVENT_PORT}]},
            "github": {
                trigger.name: {
                    "repositories": [{"owner": owner, "names": [repo]}],
                    "webhook": {
                        "endpoint": f"/{trigger.name}",
                        "port": str(EVENT_PORT),
                        "method": "POST",
                        "url": settings.webhook_url,
                    },  # fmt: skip
                    "events": ["push"],
                    "webhookSecret": {"name": f"{trigger.name}-github", "key": "secret"},
                    "insecure": False,
                    "active": True,
                    "contentType": "json",
                }
            },
        },
    }


def sensor(trigger: TriggerSpec, settings: AdaptersSettings) -> dict[str, Any]:
    """A Sensor that submits the workflow on a push to one of the trigger's branches."""
    wf = argo_workflow(trigger.workflow, settings)
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Sensor",
        "metadata": _meta(trigger.name, settings),
        "spec": {
            "template": {"serviceAccountName": f"{trigger.name}-sensor"},
            "dependencies": [
                {
                    "name": "push",
                    "eventSourceName": trigger.name,
                    "eventName": trigger.name,
                    "filters": {
                        "data": [
                            {
                                "path": "body.ref",
                                "type": "string",
                                "value": [f"refs/heads/{b}" for b in trigger.branches],
                            },
                            {"path": "headers.X-Github-Event", "type": "string", "value": ["push"]},
                        ]
                    },
                }
            ],  # fmt: skip
            "triggers": [
                {
                    "template": {
                        "name": f"{trigger.workflow.name}-submit",
                        "argoWorkflow": {
                            "operation": "submit",
                            "source": {"resource": wf},
                            "parameters": [
                                {
                                    "src": {"dependencyName": "push", "dataKey": "body.after"},
                                    "dest": "spec.arguments.parameters.0.value",
                                }
                            ],
                        },
                    },
                    "retryStrategy": {"steps": 3},
                }
            ],  # fmt: skip
        },
    }


def sensor_rbac(trigger: TriggerSpec, settings: AdaptersSettings) -> list[dict[str, Any]]:
    """The Sensor's service account may create Workflows in its namespace, nothing more."""
    name = f"{trigger.name}-sensor"
    meta = {"name": name, "namespace": settings.namespace, "labels": dict(MANAGED)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["create", "get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": settings.namespace}],
        },
    ]


def trigger_resources(trigger: TriggerSpec, settings: AdaptersSettings) -> list[dict[str, Any]]:
    return [event_source(trigger, settings), sensor(trigger, settings), *sensor_rbac(trigger, settings)]
