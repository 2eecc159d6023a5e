"""Start a real etcd (Debian ``etcd-server``) on free loopback ports, for the fleet tests."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class RunningEtcd:
    data_dir: Path
    log_path: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def store_url(self, prefix: str = "meshserve") -> str:
        return f"etcd://{self.endpoint}/{prefix}"

    def start(self, timeout: float = 20) -> RunningEtcd:
        url, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD, "--name", "fleet", "--data-dir", str(self.data_dir),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"fleet={peer}", "--log-level", "warn",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy after {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_etcd(base: Path) -> RunningEtcd:
    base.mkdir(parents=True, exist_ok=True)
    return RunningEtcd(base / "data", base / "etcd.log", free_port(), free_port()).start()
