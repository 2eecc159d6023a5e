"""Locust scenario for any Open Inference Protocol v2 server (REST).

  OIP_MODEL=echo locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8080

Environment: OIP_MODEL (default "echo"), OIP_INPUT_NAME (default "INPUT0"),
OIP_ELEMENTS (FP32 elements per request, default 4), OIP_VERIFY ("1": check every echo, default;
"0": only the status code). The model must echo its input (like examples/models/echo) for the
checks to pass; set OIP_VERIFY=0 for other models.
"""

from __future__ import annotations

import json
import os
import struct

from locust import FastHttpUser, constant, task

MODEL = os.environ.get("OIP_MODEL", "echo")
INPUT_NAME = os.environ.get("OIP_INPUT_NAME", "INPUT0")
ELEMENTS = max(1, min(int(os.environ.get("OIP_ELEMENTS", "4")), 16_777_216))
VERIFY = os.environ.get("OIP_VERIFY", "1") != "0"

VALUES = [((i % 16) - 8) * 0.25 for i in range(ELEMENTS)]  # exact in FP32 and in JSON
RAW = struct.pack(f"<{ELEMENTS}f", *VALUES)
SHAPE = [1, ELEMENTS]
INFER_PATH = f"/v2/models/{MODEL}/infer"

JSON_BODY = json.dumps({"inputs": [{"name": INPUT_NAME, "shape": SHAPE, "datatype": "FP32", "data": VALUES}]})
_HEAD = json.dumps(
    {
        "inputs": [
            {"name": INPUT_NAME, "shape": SHAPE, "datatype": "FP32", "parameters": {"binary_data_size": len(RAW)}}
        ],
        "parameters": {"binary_data_output": True},
    }
).encode()
BINARY_BODY = _HEAD + RAW
BINARY_HEADERS = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(_HEAD))}


def check_echo(body: bytes, header_len: str | None) -> str | None:
    """None if the response holds our input echoed back (JSON or binary output), else the problem."""
    head = body[: int(header_len)] if header_len else body
    resp = json.loads(head)
    offset = int(header_len) if header_len else 0
    for out in resp.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out.get("name") != INPUT_NAME:
            offset += size or 0
            continue
        if out.get("shape") != SHAPE or out.get("datatype") != "FP32":
            return f"bad metadata {out.get('datatype')} {out.get('shape')}"
        if size is not None:
            ok = body[offset : offset + size] == RAW
        else:
            ok = [float(x) for x in out.get("data", [])] == VALUES
        return None if ok else "echoed data differs"
    return f"no output {INPUT_NAME}"


class OIPUser(FastHttpUser):
    """A closed-loop client: mostly inference (JSON and binary), some health/readiness probes."""

    wait_time = constant(0)

    def _infer(self, body: str | bytes, headers: dict[str, str] | None, name: str) -> None:
        with self.client.post(INFER_PATH, data=body, headers=headers, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {str(resp.text)[:200]}")
                return
            if VERIFY:
                try:
                    err = check_echo(resp.content or b"", resp.headers.get("Inference-Header-Content-Length"))
                except (ValueError, KeyError, TypeError) as exc:
                    err = f"unparsable response: {exc}"
                if err:
                    resp.failure(err)
                    return
            resp.success()

    @task(6)
    def infer_json(self) -> None:
        """Small FP32 tensor as JSON data."""
        self._infer(JSON_BODY, {"Content-Type": "application/json"}, f"{INFER_PATH} [json]")

    @task(3)
    def infer_binary(self) -> None:
        """Small FP32 tensor with Triton's binary tensor extension, binary output requested."""
        self._infer(BINARY_BODY, BINARY_HEADERS, f"{INFER_PATH} [binary]")

    @task(1)
    def health_ready(self) -> None:
        """Server readiness."""
        self.client.get("/v2/health/ready")

    @task(1)
    def model_ready(self) -> None:
        """Model readiness."""
        self.client.get(f"/v2/models/{MODEL}/ready")
