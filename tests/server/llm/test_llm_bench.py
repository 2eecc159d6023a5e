"""loadtests/llm_bench.py keeps working: a very short run (tiny model, meshserve + sequential)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_llm_bench_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "loadtests/llm_bench.py", "--variant", "tiny", "--levels", "1,2", "--max-tokens", "4",
         "--per-stream", "1", "--systems", "meshserve,sequential", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, cwd=REPO, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "meshserve / sequential" in out.stdout
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"meshserve", "sequential"}
    assert all(r["tokens"] == r["requests"] * 4 for by_level in results.values() for r in by_level.values())
