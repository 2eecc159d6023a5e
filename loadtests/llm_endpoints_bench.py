"""What each LLM endpoint costs on top of the engine: the same streamed greedy
generations through OIP generate_stream (SSE), OpenAI chat completions (SSE, the
openai client), gRPC ModelStreamInfer (tritonclient.grpc.aio) and non-streamed
OIP generate, at one concurrency, in one run against one server.

    python loadtests/llm_endpoints_bench.py [--variant small] [--concurrency 16] [--requests 48] [--tokens 64]

Prints output tokens/s and time to first token (p50/p99) per endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Where is the Eiffel Tower?"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run(fn, concurrency: int, requests: int) -> tuple[float, list[float], int]:
    """(wall seconds, ttfts, tokens) of ``requests`` calls of fn(), ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        async with slots:
            ttft, n = await fn()
            ttfts.append(ttft)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    return time.perf_counter() - start, ttfts, tokens


def endpoints(server, tokens: int):
    import httpx
    import numpy as np
    import openai
    import orjson
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    http = httpx.AsyncClient(base_url=server.http_url, timeout=300, limits=httpx.Limits(max_connections=256))
    oai = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    params = {"max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    async def oip_stream() -> tuple[float, int]:
        t0, first, n = time.perf_counter(), None, 0
        body = orjson.dumps({"text_input": PROMPT, "parameters": params})
        async with http.stream("POST", "/v2/models/llm/generate_stream", content=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    first = first or time.perf_counter()
                    n = orjson.loads(line[6:])["completion_tokens"]
        return first - t0, n

    async def oip_whole() -> tuple[float, int]:
        t0 = time.perf_counter()
        body = orjson.dumps({"text_input": PROMPT, "parameters": params})
        r = await http.post("/v2/models/llm/generate", content=body)
        return time.perf_counter() - t0, r.json()["completion_tokens"]

    async def openai_chat() -> tuple[float, int]:
        t0, first, n = time.perf_counter(), None, 0
        stream = await oai.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": PROMPT}], stream=True, max_tokens=tokens,
            temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return (first or time.perf_counter()) - t0, n

    async def grpc_stream() -> tuple[float, int]:
        t0, first, n = time.perf_counter(), None, 0
        client = grpcaio.InferenceServerClient(server.grpc_address)
        inp = InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))

        async def requests():
            yield {"model_name": "llm", "inputs": [inp], "parameters": {**params, "stream": True}}

        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                response = result.get_response()
                if response.outputs:
                    first = first or time.perf_counter()
                    n += 1
                if response.parameters["triton_final_response"].bool_param:
                    break
        finally:
            await client.close()
        return first - t0, n  # chunks: one per token, except where a character spans tokens

    return {"OIP generate_stream (SSE)": oip_stream, "OpenAI chat stream": openai_chat,
            "gRPC ModelStreamInfer": grpc_stream, "OIP generate (whole)": oip_whole}  # fmt: skip


async def bench(server, args) -> None:
    eps = endpoints(server, args.tokens)
    await run(eps["OIP generate (whole)"], 2, 2)  # warm up
    print(f"{args.variant} Llama, {args.concurrency} concurrent, {args.requests} requests x {args.tokens} tokens")
    print("| endpoint | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) |")
    print("|---|---:|---:|---:|")
    for name, fn in eps.items():
        wall, ttfts, tokens = await run(fn, args.concurrency, args.requests)
        ttft = "" if name.endswith("(whole)") else f"{1000 * statistics.median(ttfts):.0f}"
        p99 = "" if name.endswith("(whole)") else f"{1000 * pct(ttfts, 0.99):.0f}"
        print(f"| {name} | {tokens / wall:.0f} | {ttft} | {p99} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from tests.server.llm.tiny_llama import build
    from tests.support.server import start_server

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build(models / "llm", variant=args.variant)
        server = start_server(models, Path(tmp) / "server.log", "--log-level", "warning")
        try:
            asyncio.run(bench(server, args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
