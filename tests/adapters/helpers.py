"""Data and small entry points for the adapter tests."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.server import REPO, free_port, meshserve_command

SCRIPTS = Path(__file__).parent / "scripts"


def write_partitions(target: Path, parts: int = 4, rows: int = 32, seed: int = 0) -> list[str]:
    """CSV partitions of y = 2*x1 - 3*x2 + 1 with globally unique row ids."""
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for p in range(parts):
        f = target / f"part-{p}.csv"
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "x1", "x2", "y"])
            for i in range(rows):
                x1, x2 = rng.random(), rng.random()
                w.writerow([f"p{p}-r{i}", x1, x2, 2 * x1 - 3 * x2 + 1])
        files.append(str(f))
    return files


@dataclass
class RunningSidecar:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_sidecar(log_path: Path, env: dict[str, str], *args: str, timeout: float = 60) -> RunningSidecar:
    """``meshserve adapters`` on a free loopback port (settings from ``env``: MESHSERVE_ADAPTERS_*)."""
    port = free_port()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    log = open(log_path, "ab")
    proc = subprocess.Popen([*meshserve_command(), "adapters", "--port", str(port), *args], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": pythonpath, **env})  # fmt: skip
    side = RunningSidecar(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"meshserve adapters exited with {proc.returncode}:\n{side.log()}")
        try:
            with urllib.request.urlopen(side.url + "/healthz", timeout=1):
                return side
        except OSError:
            time.sleep(0.05)
    side.stop()
    raise RuntimeError(f"meshserve adapters not up after {timeout}s:\n{side.log()}")


def wait_job(client: Any, job_id: str, timeout: float = 120) -> dict:
    """Poll an adapters job (through an httpx client with base_url and token) until it ends."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/adapters/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.get('state')} after {timeout}s")
