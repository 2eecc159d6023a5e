"""Start a real meshserve process on free ports, for tests that talk over sockets."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "models"
TEST_MODELS = REPO / "tests" / "models"


def free_port() -> int:
    """A port below the kernel's ephemeral range (32768+), so no outgoing connection of
    another process can take it between this check and the server's bind."""
    for _ in range(200):
        port = random.randrange(20000, 32700)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meshserve_command() -> list[str]:
    exe = Path(sys.executable).with_name("meshserve")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "meshserve.server.cli"]


def ensure_iris() -> None:
    if not (EXAMPLES / "iris" / "model.joblib").exists():
        subprocess.run([sys.executable, str(EXAMPLES / "iris" / "train.py")], check=True)


def make_model_dir(target: Path) -> Path:
    """The example models and the test models side by side (copied, so tests may edit them)."""
    ensure_iris()
    target.mkdir(parents=True, exist_ok=True)
    for src in [*EXAMPLES.iterdir(), *TEST_MODELS.iterdir()]:
        if src.is_dir():
            shutil.copytree(src, target / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@dataclass
class RunningServer:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    model_dir: Path | None,
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60,
) -> RunningServer:
    for attempt in range(3):
        try:
            return _start_once(model_dir, log_path, args, env, wait_ready, timeout)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """Another process bound a chosen port between the check and the server's bind."""


def _start_once(
    model_dir: Path | None,
    log_path: Path,
    args: tuple[str, ...],
    env: dict[str, str] | None,
    wait_ready: bool,
    timeout: float,
) -> RunningServer:
    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    cmd = [*meshserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(http_port)]
    cmd += ["--grpc-port", str(grpc_port), *args]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    log = open(log_path, "wb")
    # The repository on PYTHONPATH: training and workflow steps that tests submit import tests.* helpers.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})  # fmt: skip
    server = RunningServer(proc, http_port, grpc_port, log_path)
    path = "/v2/health/ready" if wait_ready else "/v2/health/live"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = server.log()
            if "Address already in use" in text:
                raise PortTaken(f"meshserve exited with {proc.returncode}:\n{text}")
            raise RuntimeError(f"meshserve exited with {proc.returncode}:\n{text}")
        try:
            with urllib.request.urlopen(server.http_url + path, timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"meshserve not ready after {timeout}s:\n{server.log()}")
