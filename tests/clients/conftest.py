"""Fixtures for the tritonclient wire tests.

These tests run in their own pytest process: tritonclient.grpc registers the
same protobuf descriptors (package ``inference``) as meshserve's own stubs, so
nothing here may import ``meshserve.protocol.grpc`` or ``meshserve.server.grpc``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.clients.cases import http_address
from tests.support.server import RunningServer, make_model_dir, start_server


@pytest.fixture(scope="session")
def http_client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(http_address(server), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@dataclass
class PrivateServer:
    server: RunningServer
    model_dir: Path


@pytest.fixture(scope="module")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    """A meshserve of this module's own, for tests that load, unload and break models
    (the session server must keep serving every model to the other tests)."""
    models = make_model_dir(tmp_path_factory.mktemp("private-models") / "models")
    srv = start_server(models, tmp_path_factory.mktemp("private-log") / "server.log")
    yield PrivateServer(srv, models)
    srv.stop()
