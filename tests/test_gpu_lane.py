"""The GPU lane's CPU side (``make test-gpu``, loadtests/gpu_lane.sh): on a machine without a
CUDA GPU it skips at once and cleanly; what runs on a GPU is checked there, not stubbed here."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "loadtests" / "gpu_lane.sh"
no_gpu_here = pytest.mark.skipif(bool(glob.glob("/dev/nvidia*")), reason="this machine has a GPU: the lane would run")


def test_the_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@no_gpu_here
def test_without_a_gpu_the_lane_says_so_and_exits_0_at_once(tmp_path):
    started = time.monotonic()
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "GPU_VENV": str(tmp_path / "venv")}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert time.monotonic() - started < 2
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "no CUDA GPU: GPU lane skipped"
    assert list(tmp_path.iterdir()) == []  # nothing made: no venv, no results folder


def test_make_has_a_test_gpu_target_that_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test-gpu:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "loadtests/gpu_lane.sh" in recipe.group(1)
    assert re.search(r"^\.PHONY:.*\btest-gpu\b", makefile, re.M)


@no_gpu_here
def test_gpu_tests_are_collected_and_skipped_not_failed_without_cuda():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "tests/gpu"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s", summary), summary
    assert int(summary.split()[0]) >= 10
    assert "no CUDA GPU" in out.stdout


def test_the_benchmark_script_imports_and_takes_its_arguments():
    out = subprocess.run([sys.executable, "loadtests/gpu_bench.py", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "--levels" in out.stdout and "1,16,64" in out.stdout
