"""Real services on loopback for the loader tests: an OCI registry (Debian's
docker-registry), an S3 server (moto's server mode) and a plain HTTP server."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.server import free_port

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class Registry:
    host: str
    data: Path
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_registry(root: Path, htpasswd: Path | None = None) -> Registry:
    if not Path(REGISTRY_BIN).exists():
        pytest.fail("docker-registry is not installed: `make test` installs it (apt-get install docker-registry)")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    auth = f"auth: {{htpasswd: {{realm: meshserve-test, path: {htpasswd}}}}}\n" if htpasswd else ""
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {data}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n" + auth
    )
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return Registry(f"127.0.0.1:{port}", data, proc)
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return Registry(f"127.0.0.1:{port}", data, proc)
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("docker-registry did not start")


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def private_registry(tmp_path):
    """A registry of the test's own, which the test may stop."""
    reg = start_registry(tmp_path / "registry")
    yield reg
    if reg.proc.poll() is None:
        reg.stop()


@pytest.fixture
def auth_registry(tmp_path):
    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode() + "\n")
    reg = start_registry(tmp_path / "registry", htpasswd)
    yield reg
    reg.stop()


def docker_config(dir_: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return dir_


@pytest.fixture
def http_dir(tmp_path):
    """A plain HTTP server on loopback serving a directory; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}", server
    server.stop()


def model_tree(root: Path) -> Path:
    """A small model folder with a nested file and a binary one."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model-settings.json").write_text(json.dumps({"runtime": "sklearn"}))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "w.bin").write_bytes(bytes(range(256)) * 64)
    (root / "README").write_text("a test model\n")
    return root


def tree_of(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".meshserve")
    }
