"""The benchmark tools keep working: a short run of bench.py against a real meshserve."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_runs_against_meshserve(server):
    out = subprocess.run(
        [
            sys.executable, "loadtests/bench.py", "--http-url", server.http_url, "--grpc-url", server.grpc_address,
            "--model", "echo", "--duration", "1", "--warmup", "0", "--quiet-wait", "0",
            "--rest-tool", "python", "--grpc-tool", "python", "--scenarios", "rest_small_binary,grpc_small",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rest_small_binary" in out.stdout and "grpc_small" in out.stdout
