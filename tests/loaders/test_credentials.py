"""Credentials go only to the host they are for: registries (settings, registry_auths,
docker config.json) and http(s) redirects, against loopback servers that record
every Authorization header they see."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from meshserve.loaders import ModelFetcher
from meshserve.loaders.oci import RegistryError, docker_credentials
from meshserve.server.settings import Settings
from pydantic import ValidationError

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


class _Recorder(BaseHTTPRequestHandler):
    """A registry (or web server) that asks for Basic auth and remembers what it was sent;
    ``redirect`` sends GETs elsewhere, ``body`` answers them."""

    seen: list[str | None]
    redirect: str | None = None
    body: bytes | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.headers.get("Authorization"))
        if self.redirect:
            self.send_response(302)
            self.send_header("Location", self.redirect + self.path)
            self.send_header("Content-Length", "0")
        elif self.body is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
        else:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
        self.end_headers()
        if self.body is not None and not self.redirect:
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorders():
    """Start recording servers on loopback; yields a factory returning (host:port, seen headers)."""
    servers = []

    def start(redirect: str | None = None, body: bytes | None = None) -> tuple[str, list[str | None]]:
        seen: list[str | None] = []
        handler = type("Handler", (_Recorder,), {"seen": seen, "redirect": redirect, "body": body})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _pull(fetcher: ModelFetcher, host: str) -> None:
    with pytest.raises(RegistryError, match="401"):
        fetcher.fetch(f"oci://{host}/models/m:1")


def test_settings_credentials_reach_their_registry_only(recorders, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    mine, mine_seen = recorders()
    other, other_seen = recorders()
    settings = Settings(
        cache_dir=tmp_path / "cache",
        insecure_registries=True,
        registry_username="alice",
        registry_password="s3cret",
        registry_credentials_host=mine,
    )
    fetcher = settings.fetcher()
    _pull(fetcher, other)
    assert other_seen and set(other_seen) == {None}  # asked, and never answered with the credential
    _pull(fetcher, mine)
    assert BASIC in mine_seen


def test_registry_auths_and_docker_config_are_keyed_by_host(recorders, tmp_path, monkeypatch):
    a, a_seen = recorders()
    b, b_seen = recorders()
    c, c_seen = recorders()
    token = base64.b64encode(b"alice:s3cret").decode()
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {f"http://{b}": {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    settings = Settings(cache_dir=tmp_path / "cache", insecure_registries=True, registry_auths={a: {"auth": token}})
    fetcher = settings.fetcher()
    for host in (a, b, c):
        _pull(fetcher, host)
    assert BASIC in a_seen and BASIC in b_seen
    assert set(c_seen) == {None}
    # The same host on another port is another registry.
    host, port = b.rsplit(":", 1)
    assert docker_credentials(f"{host}:{int(port) + 1}") is None
    assert docker_credentials(b) == ("alice", "s3cret")


def test_unscoped_registry_username_is_refused():
    with pytest.raises(ValidationError, match="registry_credentials_host"):
        Settings(registry_username="alice", registry_password="x")
    with pytest.raises(ValidationError, match="registry_auths"):
        Settings(registry_auths={"r.example": {"password": "only"}})


def test_http_credentials_are_not_forwarded_on_a_redirect(recorders, tmp_path):
    other, other_seen = recorders(body=b"weights")
    origin, origin_seen = recorders(redirect=f"http://{other}")
    fetcher = ModelFetcher(cache_dir=tmp_path / "cache")
    path = fetcher.fetch(f"http://alice:s3cret@{origin}/model.bin")
    assert (path / "model.bin").read_bytes() == b"weights"
    assert origin_seen == [BASIC]
    assert other_seen == [None]
