"""Run by the opt-in vLLM lane with a Python that has vllm (``MESHSERVE_TEST_VLLM``):
drives meshserve's VLLMEngine on a model folder and prints one JSON line of findings.

``python tests/server/llm/vllm_check.py MODEL_DIR``
"""

from __future__ import annotations

import asyncio
import json
import sys


async def collect(stream):
    chunks = [c async for c in stream]
    return {
        "tokens": [t for c in chunks for t in c.token_ids],
        "text": "".join(c.text for c in chunks),
        "finish": chunks[-1].finish_reason if chunks else None,
        "completion_tokens": chunks[-1].completion_tokens if chunks else 0,
    }


async def main(folder: str) -> dict:
    from meshserve.protocol.errors import CapacityExhausted, InvalidInput
    from meshserve.server.llm.factory import create_engine
    from meshserve.server.llm.types import SamplingParams

    params = {"engine": "vllm", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 4, "max_waiting": 2,
              "dtype": "float32"}  # fmt: skip
    engine = create_engine(folder, "tiny", params)
    found: dict = {"engine": type(engine).__name__}
    await engine.start()
    try:
        found["max_model_len"] = engine.max_model_len
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        prompts = ["Where is Eiffel Tower?", "Hi", "0 1 2"]
        results = await asyncio.gather(*[collect(engine.generate(p, greedy, f"g{i}")) for i, p in enumerate(prompts)])
        found["greedy"] = [r["tokens"] for r in results]
        found["finish"] = [r["finish"] for r in results]
        again = await collect(engine.generate(prompts[0], greedy, "again"))
        found["greedy_repeat_equal"] = again["tokens"] == results[0]["tokens"]
        seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
        a = await collect(engine.generate(prompts[0], seeded, "s1"))
        b = await collect(engine.generate(prompts[0], seeded, "s2"))
        found["seed_equal"] = a["tokens"] == b["tokens"]
        for name, sp in {"max_tokens0": SamplingParams(max_tokens=0), "huge": SamplingParams(max_tokens=10**6)}.items():
            try:
                engine.generate(prompts[0], sp, name)
                found[name] = "accepted"
            except InvalidInput as e:
                found[name] = f"InvalidInput: {e}"
        # Closing a stream mid-way aborts it in vLLM.
        stream = engine.generate(prompts[1], SamplingParams(max_tokens=200, ignore_eos=True), "closed")
        await stream.__anext__()
        await stream.aclose()
        found["active_after_close"] = engine.stats()["running"]
        # Capacity: max_num_seqs + max_waiting in flight, then 503.
        streams = [engine.generate(prompts[0], SamplingParams(max_tokens=4), f"c{i}") for i in range(6)]
        try:
            engine.generate(prompts[0], SamplingParams(max_tokens=4), "c-extra")
            found["capacity"] = "accepted"
        except CapacityExhausted:
            found["capacity"] = "CapacityExhausted"
        done = await asyncio.gather(*[collect(s) for s in streams])
        found["capacity_served"] = [d["completion_tokens"] for d in done]
        found["stats"] = engine.stats()
        found["chat"] = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        await engine.stop()
    return found


if __name__ == "__main__":
    print("RESULT " + json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
