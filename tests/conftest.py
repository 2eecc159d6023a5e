from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import RunningServer, make_model_dir, start_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_model_dir(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One meshserve for the session, serving the example and test models."""
    srv = start_server(model_dir, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()
