"""Benchmark scenarios: request payloads for OIP v2 servers and response checks."""

from __future__ import annotations

import http.client
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

GRPC_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
LARGE_SHAPE = (1, 150528)  # a 224x224x3 image, flattened
SMALL_SHAPE = (1, 4)


@dataclass(frozen=True)
class Scenario:
    """One benchmark case: protocol, tensor shape and encoding."""

    name: str
    proto: str  # "rest" or "grpc"
    shape: tuple[int, ...]
    binary: bool  # REST: Triton binary tensor extension; gRPC: always raw contents


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("rest_small_json", "rest", SMALL_SHAPE, False),
        Scenario("rest_small_binary", "rest", SMALL_SHAPE, True),
        Scenario("rest_large_binary", "rest", LARGE_SHAPE, True),
        Scenario("grpc_small", "grpc", SMALL_SHAPE, True),
        Scenario("grpc_large", "grpc", LARGE_SHAPE, True),
    )
}


@dataclass
class Payload:
    """A ready-to-send request for one scenario plus what the echo must return."""

    scenario: Scenario
    model: str
    input_name: str
    expected: np.ndarray
    body: bytes  # REST: HTTP body; gRPC: serialized ModelInferRequest
    headers: dict[str, str] = field(default_factory=dict)
    header_len: int | None = None  # REST binary: JSON header length

    @property
    def raw_size(self) -> int:
        """Bytes of tensor data (the minimum size of a binary/raw response)."""
        return int(self.expected.nbytes)

    def grpc_frame(self) -> bytes:
        """The request as a length-prefixed gRPC message (for h2load)."""
        return b"\x00" + struct.pack(">I", len(self.body)) + self.body


def load_grpc_stubs() -> tuple[Any, Any]:
    """Return (grpc_service_pb2, grpc_service_pb2_grpc), preferring the repo's protocol package."""
    try:
        from meshserve.protocol.grpc import grpc_service_pb2, grpc_service_pb2_grpc
    except ImportError:  # repo stubs not generated yet: Triton's wire-identical ones
        from tritonclient.grpc import service_pb2 as grpc_service_pb2
        from tritonclient.grpc import service_pb2_grpc as grpc_service_pb2_grpc
    return grpc_service_pb2, grpc_service_pb2_grpc


def tensor_for(shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic FP32 test data; small tensors use values exact in JSON."""
    if int(np.prod(shape)) <= 16:
        base = np.array([0.5, 1.25, -2.0, 3.75, 100.0, -0.125, 7.0, 1e-3], dtype=np.float32)
        return np.resize(base, shape).astype(np.float32)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def build_payload(scenario: Scenario, model: str, input_name: str = "INPUT0") -> Payload:
    """Build the request bytes for a scenario."""
    arr = tensor_for(scenario.shape)
    shape = list(arr.shape)
    if scenario.proto == "grpc":
        pb2, _ = load_grpc_stubs()
        req = pb2.ModelInferRequest(model_name=model)
        inp = req.inputs.add()
        inp.name, inp.datatype = input_name, "FP32"
        inp.shape.extend(shape)
        req.raw_input_contents.append(arr.tobytes())
        return Payload(scenario, model, input_name, arr, req.SerializeToString())
    inp_json: dict[str, Any] = {"name": input_name, "shape": shape, "datatype": "FP32"}
    if not scenario.binary:
        inp_json["data"] = arr.ravel().tolist()
        body = orjson.dumps({"inputs": [inp_json]})
        return Payload(scenario, model, input_name, arr, body, {"Content-Type": "application/json"})
    inp_json["parameters"] = {"binary_data_size": arr.nbytes}
    head = orjson.dumps({"inputs": [inp_json], "parameters": {"binary_data_output": True}})
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return Payload(scenario, model, input_name, arr, head + arr.tobytes(), headers, len(head))


def infer_url(http_url: str, model: str) -> str:
    """The REST inference URL for a model."""
    return f"{http_url.rstrip('/')}/v2/models/{model}/infer"


def grpc_target(grpc_url: str) -> str:
    """host:port from a gRPC URL that may carry a scheme."""
    return grpc_url.split("://", 1)[-1].rstrip("/")


def check_rest_response(p: Payload, status: int, headers: dict[str, str], body: bytes) -> str | None:
    """Return None if a REST response echoes the payload, else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    hlen = headers.get("inference-header-content-length")
    head = body[: int(hlen)] if hlen is not None else body
    binary = body[int(hlen) :] if hlen is not None else b""
    resp = orjson.loads(head)
    offset = 0
    for out in resp.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out.get("name") != p.input_name:
            offset += size or 0
            continue
        if out.get("datatype") != "FP32" or list(out.get("shape", [])) != list(p.expected.shape):
            return f"bad output metadata {out.get('datatype')} {out.get('shape')}"
        if size is not None:
            got = np.frombuffer(binary[offset : offset + size], dtype=np.float32)
        else:
            got = np.asarray(out.get("data"), dtype=np.float32)
        if got.size != p.expected.size or not np.array_equal(got.reshape(p.expected.shape), p.expected):
            return "echoed data differs from the request"
        if p.scenario.binary and size is None:
            return "binary output was requested but data came back as JSON"
        return None
    return f"no output named {p.input_name} in response"


def check_grpc_response(p: Payload, resp: Any) -> str | None:
    """Return None if a ModelInferResponse echoes the payload, else what is wrong."""
    for i, out in enumerate(resp.outputs):
        if out.name != p.input_name:
            continue
        if out.datatype != "FP32" or list(out.shape) != list(p.expected.shape):
            return f"bad output metadata {out.datatype} {list(out.shape)}"
        if i < len(resp.raw_output_contents):
            got = np.frombuffer(resp.raw_output_contents[i], dtype=np.float32)
        else:
            got = np.asarray(out.contents.fp32_contents, dtype=np.float32)
        if got.size != p.expected.size or not np.array_equal(got.reshape(p.expected.shape), p.expected):
            return "echoed data differs from the request"
        return None
    return f"no output named {p.input_name} in response"


def verify(p: Payload, http_url: str, grpc_url: str, samples: int = 3, timeout: float = 10.0) -> str | None:
    """Send ``samples`` requests synchronously and check each echo; None when all are correct."""
    if p.scenario.proto == "grpc":
        import grpc

        pb2, _ = load_grpc_stubs()
        limit = 64 * 1024 * 1024
        opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        with grpc.insecure_channel(grpc_target(grpc_url), options=opts) as channel:
            call = channel.unary_unary(
                GRPC_INFER_PATH, request_serializer=None, response_deserializer=pb2.ModelInferResponse.FromString
            )
            for _ in range(samples):
                try:
                    err = check_grpc_response(p, call(p.body, timeout=timeout))
                except grpc.RpcError as exc:
                    err = f"gRPC {exc.code()}: {exc.details()}"
                if err:
                    return err
        return None
    url = urlsplit(infer_url(http_url, p.model))
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    try:
        for _ in range(samples):
            conn.request("POST", url.path, body=p.body, headers=p.headers)
            r = conn.getresponse()
            body = r.read()
            err = check_rest_response(p, r.status, {k.lower(): v for k, v in r.getheaders()}, body)
            if err:
                return err
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return None
