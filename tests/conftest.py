from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.lanes import guard_unit_lane, mark_lanes
from tests.support.server import RunningServer, make_model_dir, start_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: runs in the test process (make test-unit)")
    config.addinivalue_line("markers", "system: starts processes or services (a server, etcd, a registry)")
    guard_unit_lane()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_lanes(items)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_model_dir(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One meshserve for the session, serving the example and test models."""
    srv = start_server(model_dir, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def torch_dirs(tmp_path_factory: pytest.TempPathFactory):
    """One tiny MLP saved four ways: TorchScript, torch.export, state dict, ONNX."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tests.server.runtimes import tiny_models as tm

    base = tmp_path_factory.mktemp("torch")
    module = tm.tiny_mlp()
    return {
        "script": tm.save_torchscript(base / "script", module),
        "export": tm.save_export(base / "export", module),
        "state_dict": tm.save_state_dict(base / "state_dict", module),
        "onnx": tm.save_onnx(base / "onnx", module),
    }
