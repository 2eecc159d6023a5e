"""Start, time, meter and stop the servers that ``bench.py --compare`` measures."""

from __future__ import annotations

import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from payloads import REPO_ROOT, grpc_target

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """An ephemeral TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ready(http_url: str, timeout: float = 0.5) -> bool:
    """True if GET /v2/health/ready answers 200."""
    u = urlsplit(http_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU seconds of a process and its live descendants (all threads, plus reaped children)."""
    info: dict[int, tuple[int, int]] = {}  # pid -> (ppid, clock ticks)
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids[:100_000]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        info[pid] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # ppid; utime stime cutime cstime
    total = 0
    for pid, (_, ticks) in info.items():
        node = pid
        for _ in range(64):  # walk up to the root, bounded depth
            if node == root:
                total += ticks
                break
            node = info.get(node, (0, 0))[0]
            if node <= 1:
                break
    return total / CLK_TCK


class ServerProc:
    """A server subprocess in its own process group, on free ports."""

    def __init__(self, label: str, cmd_tpl: str, log_dir: str, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.http_port, self.grpc_port = free_port(), free_port()
        self.cmd = cmd_tpl.format(http=self.http_port, grpc=self.grpc_port)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = os.path.join(log_dir, f"{label}.log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = -1.0

    @property
    def pid(self) -> int:
        """The server's process id (also its process group id)."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float) -> float:
        """Start the process; return seconds until /v2/health/ready answered 200. Then wait for gRPC too."""
        print(f"[{self.label}] starting: {self.cmd}  (log: {self.log_path})", file=sys.stderr, flush=True)
        with open(self.log_path, "ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                shlex.split(self.cmd),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        for _ in range(int(ready_timeout / 0.005) + 1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log_path}")
            if http_ready(self.http_url, timeout=0.2):
                self.ready_s = time.monotonic() - t0
                break
            if time.monotonic() - t0 > ready_timeout:
                break
            time.sleep(0.005)
        if self.ready_s < 0:
            self.stop()
            raise RuntimeError(f"{self.label} not ready after {ready_timeout:.0f} s; see {self.log_path}")
        import grpc

        with grpc.insecure_channel(grpc_target(self.grpc_url)) as ch:
            grpc.channel_ready_future(ch).result(timeout=ready_timeout)
        print(f"[{self.label}] ready after {self.ready_s:.3f} s, pid {self.pid}", file=sys.stderr, flush=True)
        return self.ready_s

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server's process group."""
        return tree_cpu_seconds(self.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the server's own process group, each with a bounded wait."""
        if self.proc is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                continue
