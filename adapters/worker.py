"""What a training worker sees: its rank, its data partition, its hyper-parameters,
where to write the model, and how to report metrics.

The launcher (meshserve.adapters.training) starts every worker with torchrun's environment
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) plus MESHSERVE_TRAIN_SPEC
and MESHSERVE_OUTPUT_DIR, and runs ``python -m meshserve.adapters.worker module:function``.
The same entry point runs unchanged under a Kubeflow PyTorchJob, whose operator sets
the same variables. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any


def _tf_config() -> dict[str, Any]:
    text = os.environ.get("TF_CONFIG")
    return json.loads(text) if text else {}


def rank() -> int:
    """RANK (torchrun, PyTorchJob), else the worker's index in TF_CONFIG (TFJob)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int((_tf_config().get("task") or {}).get("index", 0))


def world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return len((_tf_config().get("cluster") or {}).get("worker") or []) or 1


def spec() -> dict[str, Any]:
    inline = os.environ.get("MESHSERVE_TRAIN_SPEC_JSON")  # rendered pods carry it inline
    if inline:
        return json.loads(inline)
    path = os.environ.get("MESHSERVE_TRAIN_SPEC")
    if not path:
        return {}
    return json.loads(Path(path).read_text())


def hyperparameters() -> dict[str, Any]:
    return dict(spec().get("hyperparameters") or {})


def partition() -> list[str]:
    """This worker's data files (file sharding) or every file (row sharding)."""
    data = spec().get("data") or {}
    files = list(data.get("files") or [])
    if data.get("shard", "file") == "row":
        return files
    return files[rank() :: world_size()]


def row_shard() -> bool:
    return (spec().get("data") or {}).get("shard", "file") == "row"


def output_dir() -> Path:
    path = Path(os.environ.get("MESHSERVE_OUTPUT_DIR", "output"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_dir() -> Path:
    """Where to keep checkpoints (the job's folder locally; a volume when scaled out)."""
    path = Path(os.environ.get("MESHSERVE_CHECKPOINT_DIR", "checkpoints"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_from() -> Path | None:
    """The checkpoint to resume from when the job restarts after an interruption, else None.
    A trainer that checkpoints per epoch loads it and runs only the epochs left."""
    path = os.environ.get("MESHSERVE_RESUME_FROM")
    return Path(path) if path else None


def save_checkpoint(write: Any, name: str) -> Path:
    """Write a checkpoint atomically: ``write(path)`` fills a temporary file, which is then
    renamed, so a kill mid-write never leaves a partial checkpoint to resume from."""
    final = checkpoint_dir() / name
    tmp = final.with_name(final.name + ".tmp")
    write(tmp)
    tmp.replace(final)
    return final


def init_distributed(backend: str = "gloo", timeout_seconds: float = 120) -> Any:
    """torch.distributed.init_process_group from the launcher's environment."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return dist


def report(**metrics: float) -> None:
    """Record metrics (rank 0's count): printed as ``name=value`` lines, the format
    Katib's StdOut metrics collector parses, and kept in the job's metrics file."""
    for k, v in metrics.items():
        print(f"{k}={float(v)}", flush=True)
    path = os.environ.get("MESHSERVE_METRICS_FILE")
    if rank() != 0 or not path:
        return
    p = Path(path)
    current = json.loads(p.read_text()) if p.exists() else {}
    current.update({k: float(v) for k, v in metrics.items()})
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(current))
    tmp.replace(p)


def write_model_settings(settings: dict[str, Any]) -> Path:
    """The model-settings.json beside the model files (rank 0)."""
    path = output_dir() / "model-settings.json"
    path.write_text(json.dumps(settings, indent=2))
    return path


def _die_with_launcher() -> None:
    """Exit when the launcher (the server) dies, however it dies (Linux)."""
    parent = os.environ.get("MESHSERVE_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before prctl
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (argv[0].endswith(".py") or ":" in argv[0]):
        print("usage: python -m meshserve.adapters.worker package.module:function | script.py", file=sys.stderr)
        return 2
    _die_with_launcher()
    if argv[0].endswith(".py"):
        import runpy

        sys.argv = [argv[0]]
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    module, func = argv[0].split(":", 1)
    fn = getattr(importlib.import_module(module), func)
    result = fn()
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: torch.distributed's C++ threads (gloo) can abort() a
    # process that has finished its work while static destructors run, under load.
    os._exit(code)
