"""meshserve's vLLM engine against vLLM's own OpenAI server, on a CUDA GPU, same model,
same engine settings, in one run (the GPU lane's benchmark: loadtests/gpu_lane.sh).

    python loadtests/gpu_bench.py --model-dir examples/models/llama2 --json results.json

Both are driven exactly alike through streaming ``/v1/completions`` (llm_bench.py's
client): at each concurrency level (1, 16, 64 streams) every stream sends
``--per-stream`` requests back to back, each for ``--max-tokens`` tokens, greedy with
``ignore_eos``, so both generate the same number of tokens. Reports output tokens/s and
TTFT p50/p99 per system and level, the GPU, the versions, and meshserve / vLLM ratios
against the target (tokens/s within 5% of vLLM's own server, TTFT p50 no more than 5%
above). The servers run one after the other, each with the GPU to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loadtests.llm_bench import MODEL, drive_http, start_vllm, stop  # noqa: E402
from tests.support.server import start_server  # noqa: E402

TARGET = 0.05  # meshserve within 5% of vLLM's own server


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    except OSError:
        return "unknown (no nvidia-smi)"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("meshserve", "vllm", "torch", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def model_folder(root: Path, src: Path, engine: dict[str, Any]) -> Path:
    """``src``'s files linked into ``root/models/MODEL`` with settings for the vLLM engine."""
    folder = root / "models" / MODEL
    folder.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model-settings.json":
            (folder / f.name).symlink_to(f.resolve())
    settings = {"name": MODEL, "runtime": "llm", "parameters": {"engine": "vllm", **engine}}
    (folder / "model-settings.json").write_text(json.dumps(settings))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "examples" / "models" / "llama2",
                    help="a save_pretrained causal LM (make serve's llama2: SmolLM2-135M-Instruct)")  # fmt: skip
    ap.add_argument("--levels", default="1,16,64", help="concurrent streams per level (default 1,16,64)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--per-stream", type=int, default=0, help="requests per stream (0: max(2, 16 // streams))")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or torch.compile (faster start)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for each server to get ready")
    ap.add_argument("--systems", default="meshserve,vllm")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"{args.model_dir} has no config.json (build it: python examples/models/llama2/build.py)")
    levels = [int(x) for x in args.levels.split(",")]
    per = {c: args.per_stream or max(2, 16 // c) for c in levels}
    engine = {"dtype": args.dtype, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager}  # fmt: skip
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
             "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--disable-log-stats"]  # fmt: skip
    if args.enforce_eager:
        flags.append("--enforce-eager")
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    folder = model_folder(root, args.model_dir, engine)
    systems = args.systems.split(",")
    results: dict[str, dict[int, dict[str, Any]]] = {}

    def drive(url: str) -> dict[int, dict[str, Any]]:
        return {c: asyncio.run(drive_http(url, c, per[c], args.max_tokens)) for c in levels}

    try:
        if "meshserve" in systems:
            srv = start_server(root / "models", root / "meshserve.log", timeout=args.timeout)
            try:
                results["meshserve"] = drive(srv.http_url)
            finally:
                srv.stop(timeout=60)
        if "vllm" in systems:
            proc, url = start_vllm(sys.executable, folder, root / "vllm.log", args.max_model_len, args.timeout, flags)
            try:
                results["vllm"] = drive(url)
            finally:
                stop(proc)
    except Exception:
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)

    report = {"gpu": gpu_name(), "versions": versions(), "model": str(args.model_dir), "dtype": args.dtype,
              "max_tokens": args.max_tokens, "results": results}  # fmt: skip
    print(f"\nGPU: {report['gpu']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"model: {args.model_dir.name} ({args.dtype}), {args.max_tokens} tokens per request (greedy, ignore_eos)\n")
    print(f"{'system':<10} {'streams':>7} {'requests':>8} {'tokens/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for name, by_level in results.items():
        for c, r in by_level.items():
            print(f"{name:<10} {c:>7} {r['requests']:>8} {r['tok_s']:>10.1f} "
                  f"{r['ttft_p50'] * 1000:>12.1f} {r['ttft_p99'] * 1000:>12.1f}")  # fmt: skip
    if "meshserve" in results and "vllm" in results:
        print(f"\nmeshserve / vLLM (target: tokens/s >= {1 - TARGET:.2f}x, TTFT p50 <= {1 + TARGET:.2f}x)")
        ratios = {}
        for c in levels:
            m, v = results["meshserve"][c], results["vllm"][c]
            tok, ttft = m["tok_s"] / v["tok_s"], m["ttft_p50"] / v["ttft_p50"]
            met = tok >= 1 - TARGET and ttft <= 1 + TARGET
            ratios[c] = {"tok_s": tok, "ttft_p50": ttft, "target_met": met}
            print(f"{c:>4} streams: tokens/s {tok:.3f}x, TTFT p50 {ttft:.3f}x  {'ok' if met else 'MISSED'}")
        report["ratios"] = ratios
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
