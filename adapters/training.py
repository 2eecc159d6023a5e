"""The embedded training engine: N worker processes on this machine, torchrun-style.

Each worker gets torchrun's environment (MASTER_ADDR=127.0.0.1, a free MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK), with ``framework: tensorflow`` also TF_CONFIG (every
worker's own 127.0.0.1 port, as a TFJob's operator sets it), the job's spec file and an
output folder. When one
worker exits non-zero the others are killed (their process groups) and the job fails
with that worker's log; no worker outlives its job or its server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from meshserve.adapters.specs import TrainingSpec

LOG_TAIL = 4000


class TrainingFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


def worker_command(spec: TrainingSpec) -> list[str]:
    assert spec.entrypoint is not None
    return [sys.executable, "-m", "meshserve.adapters.worker", spec.entrypoint]


def check_model(out: Path) -> str | None:
    """Why ``out`` holds no servable model, or None when it does."""
    if not (out / "model-settings.json").is_file():
        return "the job wrote no model-settings.json to its output folder"
    try:
        json.loads((out / "model-settings.json").read_text())
    except ValueError as e:
        return f"its model-settings.json is not JSON: {e}"
    if not any(p.is_file() and p.name != "model-settings.json" for p in out.rglob("*")):
        return "the job wrote no model files to its output folder"
    return None


async def _kill(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p.wait(), 10)


def latest_checkpoint(job_dir: Path) -> Path | None:
    """The newest checkpoint a job's workers saved (``*.tmp`` files are partial writes)."""
    folder = job_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tmp")]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)


async def run_training(spec: TrainingSpec, job_dir: Path, resume_from: Path | None = None) -> dict[str, Any]:
    """Run the workers (from ``resume_from``, a checkpoint, when given); return
    {"metrics", "output_dir"}. Raises TrainingFailed."""
    job_dir.mkdir(parents=True, exist_ok=True)
    out = job_dir / "output"
    out.mkdir(exist_ok=True)
    (job_dir / "job.log").unlink(missing_ok=True)  # a resumed run's log grows from the ranks' logs
    spec_file = job_dir / "spec.json"
    spec_file.write_text(spec.model_dump_json(indent=2))
    metrics_file = job_dir / "metrics.json"
    port = free_port()
    # TensorFlow: every worker's own address, in TF_CONFIG (MultiWorkerMirroredStrategy).
    tf_cluster = [f"127.0.0.1:{free_port()}" for _ in range(spec.workers)] if spec.framework == "tensorflow" else []
    procs: list[asyncio.subprocess.Process] = []
    logs: list[Path] = []
    try:
        for rank in range(spec.workers):
            env = {
                **os.environ, **spec.env, "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec.workers), "LOCAL_WORLD_SIZE": str(spec.workers),
                "GROUP_RANK": "0", "MESHSERVE_TRAIN_SPEC": str(spec_file), "MESHSERVE_OUTPUT_DIR": str(out),
                "MESHSERVE_METRICS_FILE": str(metrics_file), "MESHSERVE_JOB_DIR": str(job_dir),
                "MESHSERVE_CHECKPOINT_DIR": str(job_dir / "checkpoints"),
                "OMP_NUM_THREADS": "1", "MESHSERVE_PARENT_PID": str(os.getpid()),
                **({"MESHSERVE_RESUME_FROM": str(resume_from)} if resume_from is not None else {}),
            }  # fmt: skip
            if tf_cluster:
                env["TF_CONFIG"] = json.dumps({"cluster": {"worker": tf_cluster},
                                               "task": {"type": "worker", "index": rank}})  # fmt: skip
            log_path = job_dir / f"rank-{rank}.log"
            logs.append(log_path)
            with open(log_path, "ab" if resume_from is not None else "wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *worker_command(spec), stdin=asyncio.subprocess.DEVNULL, stdout=log,
                        stderr=asyncio.subprocess.STDOUT, env=env, cwd=str(job_dir),
                        start_new_session=True,
                    )
                )  # fmt: skip
        waits = {asyncio.ensure_future(p.wait()): r for r, p in enumerate(procs)}
        deadline = time.monotonic() + spec.timeout_seconds
        pending = set(waits)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrainingFailed(f"timed out after {spec.timeout_seconds:g}s")
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                rank, rc = waits[fut], fut.result()
                if rc != 0:
                    raise TrainingFailed(f"worker rank {rank} exited with code {rc}:\n{tail(logs[rank])}")
    finally:
        await _kill(procs)
        _combine(job_dir, logs)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return {"metrics": metrics, "output_dir": str(out)}


def _combine(job_dir: Path, logs: list[Path]) -> None:
    with open(job_dir / "job.log", "wb") as f:
        for i, p in enumerate(logs):
            f.write(f"===== rank {i} =====\n".encode())
            with contextlib.suppress(OSError):
                f.write(p.read_bytes())


def live_log(job_dir: Path) -> str:
    """The job's log so far: the combined log once done, else each rank's."""
    combined = job_dir / "job.log"
    if combined.exists():
        return combined.read_text(errors="replace")
    parts = []
    for p in sorted(job_dir.glob("rank-*.log")):
        parts.append(f"===== {p.stem.replace('-', ' ')} =====\n" + p.read_text(errors="replace"))
    return "".join(parts)
