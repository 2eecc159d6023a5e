"""Sidecar adapters: training, tuning, workflows and events around the serving mesh.

Each adapter runs embedded on this machine by default (torch.distributed workers,
Optuna trials, a local DAG runner, a GitHub webhook) and renders the same spec as
the scaled-out engine's resource (Kubeflow PyTorchJob, Katib Experiment, Argo
Workflow, Argo Events EventSource + Sensor). Nothing here is imported by the
server unless the adapters are enabled.
"""
