"""``meshserve generate``: a whole JSONL file through one engine at full batch.

Input lines: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}``
plus optional sampling parameters (the OIP ``generate`` names; unset ones come from
``--max-tokens``/``--temperature``, then the model's ``parameters.generation``). Every prompt is
submitted at once (bounded by ``--max-in-flight``; a full engine queue waits and
retries), results are written as they finish, one flushed JSON line each, and a
rerun skips the ids already in the output (a truncated last line, from a run
that was killed, is dropped and redone).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from meshserve.protocol.errors import CapacityExhausted, InferenceError, InvalidInput
from meshserve.server.llm.api_params import OIP_FIELDS, Sampling, chat_messages, model_defaults, oip_sampling
from meshserve.server.llm.types import LLMEngine

PROMPT_DEFAULT_MAX_TOKENS = 16  # as OIP generate and OpenAI completions; chat runs up to the context
RETRY_SECONDS = 0.02


@dataclass(slots=True)
class Job:
    id: Any
    line: int
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: Sampling


def read_jobs(path: Path, defaults: dict[str, Any]) -> list[Job]:
    """Every input line checked before anything runs: a bad line stops the run naming it."""
    jobs: list[Job] = []
    seen: set[str] = set()
    if not Path(path).is_file():
        raise InvalidInput(f"input file {path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                jobs.append(_job(raw, n, defaults, seen))
            except InvalidInput as e:
                raise InvalidInput(f"{path}:{n}: {e.message}") from None
    return jobs


def _job(raw: bytes, n: int, defaults: dict[str, Any], seen: set[str]) -> Job:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("each line must be a JSON object")
    if "id" not in doc or not isinstance(doc["id"], (str, int)) or isinstance(doc["id"], bool):
        raise InvalidInput("each line needs an 'id' (a string or an integer)")
    key = _key(doc["id"])
    if key in seen:
        raise InvalidInput(f"id {doc['id']!r} appears twice")
    seen.add(key)
    prompt, messages = doc.get("prompt"), doc.get("messages")
    if (prompt is None) == (messages is None):
        raise InvalidInput("each line needs either 'prompt' or 'messages'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise InvalidInput("'prompt' must be a non-empty string")
    if messages is not None:
        messages = chat_messages(messages)
    params = {k: v for k, v in doc.items() if k not in ("id", "prompt", "messages")}
    unknown = [k for k in params if k not in OIP_FIELDS or k in ("stream", "exclude_input_in_output")]
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}")
    sampling, _ = oip_sampling({**defaults, **params})
    return Job(doc["id"], n, prompt, messages, sampling)


def _key(job_id: Any) -> str:
    return orjson.dumps(job_id).decode()


def finished_ids(path: Path) -> set[str]:
    """Ids already written; a last line cut short by a killed run is truncated away."""
    if not path.exists():
        return set()
    done: set[str] = set()
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                doc = orjson.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline: cut short")
            except ValueError:
                break
            if isinstance(doc, dict) and "id" in doc:
                done.add(_key(doc["id"]))
            good += len(raw)
    if good != path.stat().st_size:
        os.truncate(path, good)
    return done


class TokenProgress:
    """prompts done / total, tokens out and tokens/s, redrawn at most ten times a second."""

    def __init__(self, total: int, stream: IO[str] | None = None, enabled: bool = True) -> None:
        self.total, self.done, self.errors, self.tokens = total, 0, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = time.monotonic()
        self._shown = 0.0

    def add(self, tokens: int, error: bool = False) -> None:
        self.done += 1
        self.errors += error
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self._shown >= 0.1:
            self._shown = now
            self._draw(now)

    def rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-6)

    def _draw(self, now: float, end: str = "") -> None:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        errors = f" {self.errors} errors" if self.errors else ""
        counts = f"{self.done}/{self.total} prompts {self.tokens} tokens {self.rate():.1f} tok/s"
        self.stream.write(f"\rgenerate [{bar:<24}] {counts}{errors}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")


async def run_jobs(engine: LLMEngine, jobs: list[Job], out: IO[bytes], progress: TokenProgress,
                   max_in_flight: int, model: Sampling | None = None) -> None:  # fmt: skip
    slots = asyncio.Semaphore(max_in_flight)

    async def one(job: Job) -> None:
        async with slots:
            record = await _generate(engine, job, model)
        out.write(orjson.dumps(record) + b"\n")
        out.flush()
        progress.add(record.get("completion_tokens", 0), "error" in record)

    await asyncio.gather(*(one(j) for j in jobs))


async def _generate(engine: LLMEngine, job: Job, model: Sampling | None) -> dict[str, Any]:
    try:
        if job.messages is not None:
            prompt = engine.apply_chat_template(job.messages, add_generation_prompt=True)
            params = job.sampling.bind(engine.max_model_len, None, model)
        else:
            prompt = job.prompt or ""
            params = job.sampling.bind(engine.max_model_len, PROMPT_DEFAULT_MAX_TOKENS, model)
        while True:
            parts: list[str] = []
            try:
                async for chunk in engine.generate(prompt, params, f"offline-{job.line}"):
                    parts.append(chunk.text)
                    if chunk.finish_reason is not None:
                        return _record(job, "".join(parts), chunk)
                raise InferenceError("the engine ended the sequence without a finish reason")
            except CapacityExhausted:
                if parts:
                    raise
                await asyncio.sleep(RETRY_SECONDS)  # the queue is full: wait for room
    except InferenceError as e:
        return {"id": job.id, "error": e.message}
    except Exception as e:
        return {"id": job.id, "error": f"{type(e).__name__}: {e}"}


def _record(job: Job, text: str, last: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "text": text,
        "finish_reason": last.finish_reason,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
    }


def generate_file(engine_factory: Any, input_path: Path, output_path: Path, defaults: dict[str, Any],
                  max_in_flight: int, quiet: bool, model: Sampling | None = None) -> tuple[int, int, int]:  # fmt: skip
    """Run what is left of ``input_path``; returns (written now, errors, skipped as done)."""
    jobs = read_jobs(input_path, defaults)
    done = finished_ids(output_path)
    todo = [j for j in jobs if _key(j.id) not in done]
    skipped = len(jobs) - len(todo)
    if not todo:
        return 0, 0, skipped
    progress = TokenProgress(len(todo), enabled=not quiet)

    async def main() -> None:
        engine = engine_factory()
        await engine.start()
        progress.started = time.monotonic()  # tokens/s of generation, not of the model's load
        try:
            with open(output_path, "ab") as out:
                await run_jobs(engine, todo, out, progress, max_in_flight, model)
        finally:
            await engine.stop()

    asyncio.run(main())
    progress.close()
    return progress.done, progress.errors, skipped


def main(args: Any, fetcher: Any) -> int:
    """The ``meshserve generate`` subcommand (args from meshserve.server.cli)."""
    from meshserve.loaders.progress import Progress
    from meshserve.server.model_settings import read_settings_file

    if args.max_in_flight < 1:
        raise InvalidInput("--max-in-flight must be at least 1")
    defaults: dict[str, Any] = {}
    if args.max_tokens is not None:
        defaults["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        defaults["temperature"] = args.temperature
    read_jobs(args.input, defaults)  # a bad input file fails before the model is fetched
    fetch_progress = Progress(f"fetch {args.model}", enabled=not args.quiet)
    path = Path(fetcher.fetch(args.model, progress=fetch_progress))
    if fetch_progress.done:
        fetch_progress.close()
    doc = (read_settings_file(path) or {}) if path.is_dir() else {}
    name = args.name or doc.get("name") or path.name
    parameters = dict(doc.get("parameters") or {})

    def factory() -> LLMEngine:
        from meshserve.server.llm.factory import create_engine

        return create_engine(path, name, parameters)

    model = model_defaults(parameters.get("generation"))
    written, errors, skipped = generate_file(
        factory, args.input, args.output, defaults, args.max_in_flight, args.quiet, model
    )
    print(f"{written} written ({errors} errors), {skipped} already in {args.output}", file=sys.stderr)
    return 1 if errors else 0
