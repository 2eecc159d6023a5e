"""Closed-loop load generators: wrk (REST), h2load (gRPC) and multi-process Python fallbacks."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from payloads import GRPC_INFER_PATH, Payload, grpc_target, infer_url

MAX_REQUESTS_PER_WORKER = 5_000_000


@dataclass
class LoadResult:
    """Throughput/latency of one closed-loop run."""

    tool: str
    requests: int
    errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    note: str = ""

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat; 0.0 where unavailable)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def have(tool: str) -> bool:
    """True if an executable is on PATH."""
    return shutil.which(tool) is not None


WRK_LUA = """
local f = assert(io.open("{body_path}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
local min_len = {min_len}
local threads = {{}}
bad = 0
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status ~= 200 or #body < min_len then bad = bad + 1 end
end
function done(summary, latency, requests)
  local nbad = 0
  for _, t in ipairs(threads) do nbad = nbad + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"sock":%d,"status":%d,"bad":%d,"p50":%d,"p99":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status, nbad,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    p: Payload,
    http_url: str,
    concurrency: int,
    duration: float,
    threads: int = 1,
    warmup: float = 1.0,
    check_body: bool = True,
) -> LoadResult:
    """Benchmark a REST payload with wrk, posting a fixed body prepared in a file."""
    with tempfile.TemporaryDirectory(prefix="oipbench") as tmp:
        body_path = os.path.join(tmp, "body.bin")
        with open(body_path, "wb") as f:
            f.write(p.body)
        headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in p.headers.items())
        min_len = p.raw_size if p.scenario.binary else 1
        lua = WRK_LUA.format(body_path=body_path, headers=headers, min_len=min_len)
        if not check_body:  # no response() hook: wrk then skips handing bodies to Lua
            lua = re.sub(r"function response.*?\nend\n", "", lua, flags=re.DOTALL)
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(lua)
        url = infer_url(http_url, p.model)
        threads = max(1, min(threads, concurrency))
        base = ["wrk", f"-t{threads}", f"-c{concurrency}", "--timeout", "10s", "-s", script]
        if warmup > 0:
            subprocess.run(
                [*base, f"-d{max(1, round(warmup))}s", url], check=False, capture_output=True, timeout=warmup + 30
            )
        proc = subprocess.run(
            [*base, f"-d{max(1, round(duration))}s", url],
            check=False,
            capture_output=True,
            text=True,
            timeout=duration + 60,
        )
    m = re.search(r"BENCHJSON (\{.*\})", proc.stdout)
    if not m:
        raise RuntimeError(f"wrk failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    d = json.loads(m.group(1))
    errors = d["sock"] + max(d["status"], d["bad"])
    return LoadResult(f"wrk -t{threads}", d["requests"], errors, d["duration_us"] / 1e6, d["p50"] / 1e3, d["p99"] / 1e3)


def _h2_bytes(text: str, label: str) -> int:
    m = re.search(r"\((\d+)\) " + label, text)
    return int(m.group(1)) if m else 0


def run_h2load(
    p: Payload, grpc_url: str, concurrency: int, duration: float, warmup: float = 1.0, streams: int = 1
) -> LoadResult:
    """Benchmark a gRPC payload with h2load posting a pre-framed ModelInferRequest."""
    with tempfile.TemporaryDirectory(prefix="oipbench") as tmp:
        data = os.path.join(tmp, "req.grpc")
        with open(data, "wb") as f:
            f.write(p.grpc_frame())
        log = os.path.join(tmp, "h2.log")
        cmd = [
            "h2load",
            f"-c{concurrency}",
            f"-m{streams}",
            "-t1",
            "-D",
            str(max(1, round(duration))),
            *(["--warm-up-time", str(max(1, round(warmup)))] if warmup > 0 else []),
            "-d",
            data,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--log-file",
            log,
            f"http://{grpc_target(grpc_url)}{GRPC_INFER_PATH}",
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=duration + warmup + 60)
        out = proc.stdout
        lat_us = np.loadtxt(log, usecols=2, ndmin=1) if os.path.getsize(log) else np.zeros(0)
    m = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if not m:
        raise RuntimeError(f"h2load failed: {out[-500:]} {proc.stderr[-500:]}")
    done, ok = int(m.group(2)), int(m.group(3))
    errors = int(m.group(4)) + int(m.group(5)) + int(m.group(6))
    note = ""
    data_bytes = _h2_bytes(out, "data")
    if ok and data_bytes / ok < p.raw_size:  # a gRPC error comes back as HTTP 200 with no message
        errors = done
        note = f"responses average {data_bytes / ok:.0f} B < tensor {p.raw_size} B"
    secs = max(1, round(duration))
    p50, p99 = (np.percentile(lat_us, [50, 99]) / 1e3).tolist() if lat_us.size else (0.0, 0.0)
    return LoadResult(f"h2load -m{streams}", done, errors, float(secs), p50, p99, note)


# ---------------------------------------------------------------- Python fallbacks (one worker per process)


async def _http_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one HTTP/1.1 request on a keep-alive connection and read the full response; return status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", low)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif b"transfer-encoding: chunked" in low:
        for _ in range(1_000_000):
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _rest_worker(p: Payload, http_url: str, conns: int, start_at: float, end_at: float) -> tuple[list, int]:
    url = urlsplit(infer_url(http_url, p.model))
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in p.headers.items())
    request = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n{hdrs}Content-Length: {len(p.body)}\r\n\r\n"
    ).encode() + p.body
    lat: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            conn = await asyncio.open_connection(url.hostname, url.port, limit=1 << 20)
        except OSError:
            errors += 1
        await asyncio.sleep(max(0.0, start_at - time.time()))  # all clients start together
        for _ in range(MAX_REQUESTS_PER_WORKER):
            t0 = time.time()
            if t0 >= end_at:
                break
            try:
                if conn is None:
                    conn = await asyncio.open_connection(url.hostname, url.port, limit=1 << 20)
                status = await _http_one(conn[0], conn[1], request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)
                continue
            if t0 >= start_at:
                lat.append(time.time() - t0)
                errors += status != 200
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(conns)))
    return lat, errors


async def _grpc_worker(p: Payload, grpc_url: str, conns: int, start_at: float, end_at: float) -> tuple[list, int]:
    import grpc

    limit = 64 * 1024 * 1024
    opts = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    lat: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        async with grpc.aio.insecure_channel(grpc_target(grpc_url), options=opts) as channel:
            call = channel.unary_unary(GRPC_INFER_PATH, request_serializer=None, response_deserializer=None)
            await asyncio.wait_for(channel.channel_ready(), timeout=max(1.0, start_at - time.time()))
            await asyncio.sleep(max(0.0, start_at - time.time()))  # all clients start together
            for _ in range(MAX_REQUESTS_PER_WORKER):
                t0 = time.time()
                if t0 >= end_at:
                    break
                try:
                    resp = await call(p.body, timeout=10)
                    bad = len(resp) < p.raw_size
                except grpc.RpcError:
                    bad = True
                if t0 >= start_at:
                    lat.append(time.time() - t0)
                    errors += bad

    await asyncio.gather(*(client() for _ in range(conns)))
    return lat, errors


def _worker_main(kind: str, p: Payload, url: str, conns: int, start_at: float, end_at: float) -> tuple[bytes, int]:
    """Process entry point: run one asyncio worker, return (float64 latencies, errors)."""
    run = asyncio.run
    try:
        import uvloop

        run = getattr(uvloop, "run", run)
    except ImportError:
        pass
    fn = _rest_worker if kind == "rest" else _grpc_worker
    lat, errors = run(fn(p, url, conns, start_at, end_at))
    return np.asarray(lat, dtype=np.float64).tobytes(), errors


def run_python(
    p: Payload, url: str, concurrency: int, duration: float, procs: int = 2, warmup: float = 1.0
) -> LoadResult:
    """Benchmark with ``procs`` Python processes sharing ``concurrency`` closed-loop clients."""
    procs = max(1, min(procs, concurrency))
    split = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    start_at = time.time() + 3.0 + warmup  # time for the spawned workers to import and connect
    end_at = start_at + duration
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        futs = [pool.submit(_worker_main, p.scenario.proto, p, url, n, start_at, end_at) for n in split]
        parts = [f.result(timeout=duration + warmup + 120) for f in futs]
    lat = np.concatenate([np.frombuffer(b, dtype=np.float64) for b, _ in parts])
    errors = sum(e for _, e in parts)
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3).tolist() if lat.size else (0.0, 0.0)
    kind = "python-raw-http" if p.scenario.proto == "rest" else "python-grpc.aio"
    return LoadResult(f"{kind} x{procs}", int(lat.size), errors, duration, p50, p99)
