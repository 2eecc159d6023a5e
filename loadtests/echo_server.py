"""Bare Open Inference Protocol v2 echo server: the yardstick for meshserve.

REST: a raw ASGI callable served by uvicorn (uvloop + httptools, one process,
no access log). gRPC: a grpc.aio ``inference.GRPCInferenceService`` servicer.
Both echo every input tensor back as an output of the same name, datatype and
shape, after decoding it into a numpy array (what any real server must do).

Usage: python loadtests/echo_server.py --http-port 8080 --grpc-port 8081

``--processes N`` runs N such servers on the same ports (``SO_REUSEPORT``: the kernel spreads
connections over them), the yardstick for ``meshserve serve --workers N``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_BODY = 512 * 1024 * 1024
JOIN_BELOW = 64 * 1024  # responses up to this size are joined and sent with one write
MAX_BODY_CHUNKS = 1_000_000
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),  # no numpy bfloat16: carried as raw 16-bit words
}
HEADER_LEN = b"inference-header-content-length"
JSON_HEADERS = [(b"content-type", b"application/json")]


class InferError(Exception):
    """A client error, answered with HTTP 400 / gRPC INVALID_ARGUMENT."""


def load_grpc_stubs() -> tuple[Any, Any]:
    """Return (grpc_service_pb2, grpc_service_pb2_grpc) from the repo's protocol package."""
    try:
        from meshserve.protocol.grpc import grpc_service_pb2, grpc_service_pb2_grpc
    except ImportError:  # repo stubs not generated yet: Triton's wire-identical ones
        from tritonclient.grpc import service_pb2 as grpc_service_pb2
        from tritonclient.grpc import service_pb2_grpc as grpc_service_pb2_grpc
    return grpc_service_pb2, grpc_service_pb2_grpc


def decode_bytes(raw: bytes, limit: int) -> list[bytes]:
    """Split a BYTES tensor's 4-byte-length-prefixed serialization into elements."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw) and len(out) < limit:
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def encode_bytes(items: list[Any]) -> bytes:
    """Serialize BYTES elements with 4-byte little-endian length prefixes."""
    parts: list[bytes] = []
    for item in items:
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def to_array(datatype: str, shape: list[int], data: Any, raw: bytes | memoryview | None) -> np.ndarray:
    """Decode one input (JSON data or raw bytes) into a numpy array of ``shape``."""
    if datatype == "BYTES":
        if raw is not None:
            return np.frombuffer(raw, dtype=np.uint8)  # kept serialized; echoed as is
        return np.asarray(data, dtype=object).reshape(shape)
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InferError(f"unsupported datatype {datatype}")
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    return np.asarray(data, dtype=dtype).reshape(shape)


def tensor_bytes(datatype: str, arr: np.ndarray) -> bytes:
    """Serialize an array to the binary tensor wire format (reusing the bytes it views, if any)."""
    if datatype == "BYTES" and arr.dtype == object:
        return encode_bytes(arr.ravel().tolist())
    base = arr
    for _ in range(4):  # an np.frombuffer view of a whole bytes object: echo that object, no copy
        base = base.base
        if base is None or isinstance(base, bytes):
            break
    if isinstance(base, bytes) and len(base) == arr.nbytes and arr.flags.c_contiguous:
        return base
    return arr.tobytes()


def tensor_view(datatype: str, arr: np.ndarray) -> bytes | memoryview:
    """The binary wire form of an array as a zero-copy byte view where possible."""
    if datatype == "BYTES" and arr.dtype == object:
        return encode_bytes(arr.ravel().tolist())
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def tensor_json(datatype: str, arr: np.ndarray) -> Any:
    """Flat row-major JSON data for an array (orjson serializes numpy natively)."""
    if datatype == "BYTES":
        if arr.dtype != object:
            return [b.decode(errors="replace") for b in decode_bytes(arr.tobytes(), 1 << 30)]
        return [x.decode(errors="replace") if isinstance(x, bytes) else x for x in arr.ravel().tolist()]
    return np.ascontiguousarray(arr).ravel()


def infer_rest(model: str, body: bytes, header_len: int | None) -> tuple[list[bytes | memoryview], int | None]:
    """Echo a REST inference request; return (response body parts, JSON header length or None).

    Binary inputs are np.frombuffer views of the request body and binary outputs memoryviews of
    those arrays: no tensor bytes are copied in Python.
    """
    if header_len is not None:
        if header_len < 0 or header_len > len(body):
            raise InferError("bad Inference-Header-Content-Length")
        req = orjson.loads(body[:header_len])
        binary = memoryview(body)[header_len:]
    else:
        req = orjson.loads(body)
        binary = memoryview(b"")
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InferError("request must be an object with an 'inputs' list")
    params = req.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False))
    arrays: dict[str, tuple[str, list[int], np.ndarray]] = {}
    offset = 0
    for inp in req["inputs"]:
        name, datatype, shape = inp["name"], inp["datatype"], inp["shape"]
        size = (inp.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if offset + size > len(binary):
                raise InferError(f"input {name}: binary data shorter than binary_data_size")
            raw = binary[offset : offset + size]
            offset += size
        arrays[name] = (datatype, shape, to_array(datatype, shape, inp.get("data"), raw))
    wanted = req.get("outputs")
    if wanted:
        selected = [(o["name"], bool((o.get("parameters") or {}).get("binary_data", all_binary))) for o in wanted]
    else:
        selected = [(name, all_binary) for name in arrays]
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for name, as_binary in selected:
        if name not in arrays:
            raise InferError(f"unknown output {name}")
        datatype, shape, arr = arrays[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if as_binary:
            blob = tensor_view(datatype, arr)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = tensor_json(datatype, arr)
        outputs.append(out)
    resp: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if "id" in req:
        resp["id"] = req["id"]
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return [head], None
    return [head, *blobs], len(head)


async def read_body(receive: Receive) -> bytes:
    """Read the full request body (bounded in size and chunk count)."""
    chunks: list[bytes] = []
    total = 0
    for _ in range(MAX_BODY_CHUNKS):
        msg = await receive()
        chunk = msg.get("body", b"")
        if chunk:
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BODY:
                raise InferError("request body too large")
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(
    send: Send, status: int, body: bytes | list[bytes | memoryview], headers: list[tuple[bytes, bytes]]
) -> None:
    """Send a complete HTTP response; a list body goes out part by part (no joining copy)."""
    parts = body if isinstance(body, list) else [body]
    total = sum(len(p) for p in parts)
    if len(parts) > 1 and total <= JOIN_BELOW:  # one write beats several for small responses
        parts = [b"".join(parts)]
    headers = [*headers, (b"content-length", str(total).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for i, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI application: health, readiness and echo inference."""
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    method: str = scope["method"]
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) >= 4 and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
        header_len = None
        for key, value in scope["headers"]:
            if key == HEADER_LEN:
                header_len = int(value)
        try:
            body = await read_body(receive)
            out, out_header_len = infer_rest(parts[2], body, header_len)
        except (InferError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            await respond(send, 400, orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}), JSON_HEADERS)
            return
        if out_header_len is None:
            await respond(send, 200, out, JSON_HEADERS)
        else:
            headers = [(b"content-type", b"application/octet-stream"), (HEADER_LEN, str(out_header_len).encode())]
            await respond(send, 200, out, headers)
        return
    if method == "GET":
        if path in ("/v2/health/ready", "/v2/health/live"):
            await respond(send, 200, b"", [])
            return
        if path == "/v2":
            meta = {"name": "echo_server", "version": "0", "extensions": ["binary_tensor_data"]}
            await respond(send, 200, orjson.dumps(meta), JSON_HEADERS)
            return
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            if parts[-1] == "ready":
                await respond(send, 200, b"", [])
                return
            meta = {"name": parts[2], "versions": ["1"], "platform": "echo", "inputs": [], "outputs": []}
            await respond(send, 200, orjson.dumps(meta), JSON_HEADERS)
            return
    await respond(send, 404, orjson.dumps({"error": f"not found: {method} {path}"}), JSON_HEADERS)


def make_servicer(pb2: Any, pb2_grpc: Any) -> Any:
    """Build a GRPCInferenceService servicer that echoes ModelInfer inputs."""
    import grpc

    contents_field = {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }

    class EchoServicer(pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc,name-defined]
        """Echo servicer: raw_input_contents -> numpy -> raw_output_contents."""

        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.ModelReadyResponse(ready=True)

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            resp = pb2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version or "1", id=request.id
            )
            raw_inputs = request.raw_input_contents
            wanted = {o.name for o in request.outputs}
            try:
                for i, inp in enumerate(request.inputs):
                    if wanted and inp.name not in wanted:
                        continue
                    shape = list(inp.shape)
                    if i < len(raw_inputs):
                        arr = to_array(inp.datatype, shape, None, raw_inputs[i])
                    else:
                        field = contents_field.get(inp.datatype)
                        if field is None:
                            raise InferError(f"unsupported datatype {inp.datatype}")
                        values = list(getattr(inp.contents, field))
                        arr = to_array(inp.datatype, shape, values, None)
                    out = resp.outputs.add()
                    out.name = inp.name
                    out.datatype = inp.datatype
                    out.shape.extend(shape)
                    resp.raw_output_contents.append(tensor_bytes(inp.datatype, arr))
            except (InferError, ValueError, TypeError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return resp

    return EchoServicer()


async def serve(host: str, http_port: int, grpc_port: int, reuse_port: bool = False) -> None:
    """Run the REST and gRPC servers on one event loop until cancelled (``reuse_port``: the REST
    socket is bound with ``SO_REUSEPORT``, as grpc binds its own by default on Linux)."""
    import grpc
    import uvicorn

    tasks: list[Awaitable[Any]] = []
    grpc_server = None
    if grpc_port > 0:
        pb2, pb2_grpc = load_grpc_stubs()
        limit = 256 * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        grpc_server = grpc.aio.server(options=options)
        pb2_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(pb2, pb2_grpc), grpc_server)
        grpc_server.add_insecure_port(f"{host}:{grpc_port}")
        await grpc_server.start()
    if http_port > 0:
        config = uvicorn.Config(
            app,
            host=host,
            port=http_port,
            loop="none",
            http="httptools",
            access_log=False,
            log_level="warning",
            lifespan="off",
        )
        sockets = None
        if reuse_port:
            import socket

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, http_port))
            sockets = [sock]
        tasks.append(uvicorn.Server(config).serve(sockets=sockets))
    elif grpc_server is not None:
        tasks.append(grpc_server.wait_for_termination())
    try:
        await asyncio.gather(*tasks)
    finally:
        if grpc_server is not None:
            await grpc_server.stop(0.5)


def tune_malloc(mmap_threshold: int) -> bool:
    """Fix glibc's mmap and trim thresholds (as meshserve does) so large-tensor figures are stable.

    With glibc's dynamic defaults, whether a 600 KB request buffer comes from the heap or from
    a fresh mmap (page faults on every request) changes during a run: large-tensor throughput
    then swings about 2x from run to run.
    """
    if mmap_threshold <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, mmap_threshold) == 1  # M_MMAP_THRESHOLD
        return bool(ok and libc.mallopt(-1, 8 * mmap_threshold) == 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the echo server."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=8080, help="0 disables REST")
    ap.add_argument("--grpc-port", type=int, default=8081, help="0 disables gRPC")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop for both servers")
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="fixed glibc mmap threshold (trim threshold 8x); 0 keeps glibc's dynamic default",
    )
    ap.add_argument("--processes", type=int, default=1, help="servers sharing the ports (SO_REUSEPORT)")
    args = ap.parse_args(argv)
    tune_malloc(args.malloc_mmap_threshold)
    others = []
    if args.processes > 1:
        import subprocess

        for _ in range(args.processes - 1):
            cmd = [sys.executable, os.path.abspath(__file__), "--host", args.host, "--http-port", str(args.http_port),
                   "--grpc-port", str(args.grpc_port), "--loop", args.loop,
                   "--malloc-mmap-threshold", str(args.malloc_mmap_threshold)]  # fmt: skip
            others.append(subprocess.Popen(cmd))
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        if hasattr(uvloop, "run"):
            run = uvloop.run
        else:  # uvloop < 0.18
            uvloop.install()
    try:
        run(serve(args.host, args.http_port, args.grpc_port, reuse_port=args.processes > 1))
    except KeyboardInterrupt:
        pass
    finally:
        for p in others:
            p.terminate()


if __name__ == "__main__":
    main()
