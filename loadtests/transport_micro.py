"""Microseconds per request that meshserve's own Python spends, measured in-process.

Throughput on a shared machine swings with its neighbours; this does not. One process,
no sockets: the REST figure feeds a keep-alive request's bytes to the bounded uvicorn
protocol (server/rest/connections.py) over an in-memory transport and waits for the
response, through the front, the data plane and the example ``echo`` model; the gRPC
figure calls the servicer's ``ModelInfer`` with the request parsed from its wire bytes,
the way grpc.aio would, and serializes the answer. Both with default settings (access log
``errors``, metrics on). What the kernel, uvloop's I/O and grpc core cost is not here:
``transport_bench.py`` measures whole servers.

  python loadtests/transport_micro.py
  python loadtests/transport_micro.py --requests 50000 --rounds 5 --only rest
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from payloads import REPO_ROOT, SCENARIOS, build_payload


class MemoryTransport(asyncio.Transport):
    """What the protocol writes, kept; a response is complete when the cycle says so."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class GrpcContext:
    """The part of ``grpc.aio.ServicerContext`` ModelInfer reads (a client with no deadline)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata
        self.trailing: Any = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_trailing_metadata(self, md: Any) -> None:
        self.trailing = md

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


async def rest_us(process: Any, settings: Any, n: int) -> float:
    import uvicorn
    from meshserve.server.rest.connections import bounded_http_protocol
    from uvicorn.server import ServerState

    p = build_payload(SCENARIOS["rest_small_json"], "echo", "INPUT0")
    head = "POST /v2/models/echo/infer HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    request = (head + f"content-length: {len(p.body)}\r\n\r\n").encode() + p.body
    cls = bounded_http_protocol(settings.max_header_bytes, settings.header_timeout_seconds)
    config = uvicorn.Config(process.rest_app, http=cls, lifespan="off", access_log=False, log_config=None)
    config.load()
    state = ServerState()
    proto = cls(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    transport = MemoryTransport()
    proto.connection_made(transport)

    async def one() -> None:
        proto.data_received(request)
        for task in list(state.tasks):
            await task

    for _ in range(min(n, 2000)):
        await one()
    transport.written.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        await one()
    took = time.perf_counter() - t0
    answers = b"".join(transport.written)
    if answers.count(b"HTTP/1.1 200") != n or transport.closed:
        raise SystemExit(f"REST: expected {n} answers of 200, got {answers[:300]!r}")
    proto.connection_lost(None)
    return took / n * 1e6


async def grpc_us(process: Any, n: int) -> float:
    from meshserve.protocol.grpc import grpc_service_pb2 as pb
    from meshserve.server.grpc.servicer import InferenceServicer, _wire

    p = build_payload(SCENARIOS["grpc_small"], "echo", "INPUT0")
    servicer = InferenceServicer(process.dataplane)
    metadata = (("user-agent", "grpc-c/1.0"), ("te", "trailers"))

    async def one() -> bytes:
        context = GrpcContext(metadata)
        response = await servicer.ModelInfer(pb.ModelInferRequest.FromString(p.body), context)
        return _wire(response)  # the serializer grpc.aio calls on ModelInfer's answer

    for _ in range(min(n, 2000)):
        await one()
    t0 = time.perf_counter()
    for _ in range(n):
        out = await one()
    took = time.perf_counter() - t0
    answer = pb.ModelInferResponse.FromString(out)
    if answer.raw_output_contents[0] != p.expected.tobytes():
        raise SystemExit(f"gRPC: wrong echo {answer}")
    return took / n * 1e6


async def main_async(args: argparse.Namespace, model_dir: Path) -> dict[str, list[float]]:
    from meshserve.server.compose import build_process
    from meshserve.server.observe import configure_logging
    from meshserve.server.settings import Settings

    settings = Settings(model_dir=model_dir, host="127.0.0.1")
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    process = build_process(settings)
    await process.dataplane.start()
    out: dict[str, list[float]] = {"rest": [], "grpc": []}
    try:
        for _ in range(args.rounds):
            if args.only in ("", "rest"):
                out["rest"].append(await rest_us(process, settings, args.requests))
            if args.only in ("", "grpc"):
                out["grpc"].append(await grpc_us(process, args.requests))
    finally:
        await process.dataplane.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--requests", type=int, default=20_000, help="per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["", "rest", "grpc"], default="")
    args = ap.parse_args(argv)
    args.requests = min(max(args.requests, 100), 10_000_000)
    args.rounds = min(max(args.rounds, 1), 50)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with tempfile.TemporaryDirectory(prefix="transport-micro") as tmp:
        shutil.copytree(Path(REPO_ROOT) / "examples" / "models" / "echo", Path(tmp) / "echo")
        run = uvloop.run if uvloop is not None else asyncio.run
        out = run(main_async(args, Path(tmp)))
    for kind, values in out.items():
        if values:
            rounds = ", ".join(f"{v:.1f}" for v in values)
            print(f"{kind}: {min(values):.1f} us/request in-process (min of {len(values)}: {rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
