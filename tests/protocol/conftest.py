"""A real server with only the echo model, for the socket tests and fuzzers of this folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import httpx
import pytest
from meshserve.protocol.grpc import grpc_service_pb2_grpc as pb_grpc

from tests.support.server import EXAMPLES, RunningServer, start_server


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Default flags: the bounds under test are the ones a default server enforces."""
    base = tmp_path_factory.mktemp("echo")
    shutil.copytree(EXAMPLES / "echo", base / "models" / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    srv = start_server(base / "models", base / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(echo_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=echo_server.http_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def stub(echo_server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    limit = 300 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(echo_server.grpc_address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
