"""The LLM engine core alone: decode tokens/s of a full batch, no HTTP, no tokenizer, no process.

    python loadtests/llm_engine_bench.py                 # both forwards, 16 rows x 64 tokens
    python loadtests/llm_engine_bench.py --fast-forward false --rows 16
    python loadtests/llm_engine_bench.py --fast-forward true --packed-linear both   # oneDNN packed vs F.linear

Drives :class:`meshserve.server.llm.core.EngineCore` on this thread: ``--rows`` greedy
requests of ``--tokens`` tokens each (``min_tokens`` and ``ignore_eos``, so every one runs to
length) are added at once and stepped to the end; reports tokens/s over the whole run
(prefill included) and the median decode step. The model is tests/server/llm/tiny_llama.py's
"small" variant (random weights). One process, ``--threads`` intra-op threads: on a shared
machine compare the two forwards from one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from meshserve.server.llm.core import CoreRequest, EngineCore  # noqa: E402
from meshserve.server.llm.types import SamplingParams  # noqa: E402

from tests.server.llm.tiny_llama import build  # noqa: E402


def run(
    folder: Path, fast: bool, rows: int, tokens: int, threads: int, rounds: int, packed: bool = True
) -> dict[str, float]:
    core = EngineCore(folder, {"fast_forward": fast, "max_num_seqs": max(rows, 1), "packed_linear": packed})
    core.load(threads)
    prompt = list(range(10, 30))
    best: dict[str, float] = {}
    for r in range(rounds + 1):  # the first round warms up
        for i in range(rows):
            params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
            core.add(CoreRequest(r * 1000 + i, [*prompt, i], params, tokens))
        steps: list[float] = []
        made = 0
        started = time.perf_counter()
        while core.busy():
            msg = core.step()
            made += len(msg[1])
            if msg[2] is not None:
                steps.append(msg[2])
        wall = time.perf_counter() - started
        if r and (not best or made / wall > best["tok_s"]):
            best = {"tok_s": made / wall, "step_ms": statistics.median(steps) * 1e3, "tokens": made}
    core.release()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (the best is reported)")
    ap.add_argument("--fast-forward", default="both", choices=["both", "true", "false"])
    ap.add_argument(
        "--packed-linear",
        default="true",
        choices=["both", "true", "false"],
        help="the fast forward's linear layers on oneDNN's packed weights (the default) or F.linear",
    )
    args = ap.parse_args()
    folder = build(Path(tempfile.mkdtemp(prefix="llm-engine-bench-")) / "small", variant="small")
    modes = [True, False] if args.fast_forward == "both" else [args.fast_forward == "true"]
    packings = [True, False] if args.packed_linear == "both" else [args.packed_linear == "true"]
    for fast, packed in [(f, p) for f in modes for p in (packings if f else [False])]:
        res = run(folder, fast, args.rows, args.tokens, args.threads, args.rounds, packed)
        label = f"fast_forward={str(fast).lower():5} packed_linear={str(packed).lower():5} rows={args.rows}"
        label += f" tokens={args.tokens} threads={args.threads}"
        print(f"{label}: {res['tok_s']:,.0f} tok/s, decode step p50 {res['step_ms']:.2f} ms ({res['tokens']} tokens)")


if __name__ == "__main__":
    main()
