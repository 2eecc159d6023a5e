"""``serve --adapters``: the sidecar as a child process of the serving process.

One machine, one command: the child listens on a loopback port of its own, accepts the
server's token(s), drives the server through its public API, and dies with it (Linux:
PR_SET_PDEATHSIG; its training workers die with it in turn). The serving process (all
its workers) only proxies ``/v1/adapters/*`` to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshserve.server.settings import Settings

PREFIX = "MESHSERVE_ADAPTERS_"
START_SECONDS = 60


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert is not None and settings.tls_key is not None else "http"
    return f"{scheme}://{host}:{settings.http_port}"


def _first_token(settings: Settings) -> str | None:
    if settings.auth_token is not None and settings.auth_token.get_secret_value():
        return settings.auth_token.get_secret_value()
    if settings.auth_token_file is not None:
        for line in Path(settings.auth_token_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
    return None


def child_env(settings: Settings, port: int) -> dict[str, str]:
    """The child's MESHSERVE_ADAPTERS_* settings: the server's adapters_config under the
    environment's own values (as before), plus where to listen and whom to call."""
    env = dict(os.environ)
    for key, value in (settings.adapters_config or {}).items():
        env.setdefault(PREFIX + key.upper(), str(value))
    if settings.model_dir is not None:
        env.setdefault(PREFIX + "MODEL_DIR", str(Path(settings.model_dir).resolve()))
    env[PREFIX + "HOST"] = "127.0.0.1"
    env[PREFIX + "PORT"] = str(port)
    env[PREFIX + "MODEL_SERVER_URL"] = _server_url(settings)
    if settings.tls_cert is not None:
        env[PREFIX + "MODEL_SERVER_VERIFY"] = "false"  # its own parent, over loopback
    token = _first_token(settings)
    if token:
        env[PREFIX + "MODEL_SERVER_TOKEN"] = token
    if settings.auth_token is not None and settings.auth_token.get_secret_value():
        env[PREFIX + "AUTH_TOKEN"] = settings.auth_token.get_secret_value()
    if settings.auth_token_file is not None:
        env[PREFIX + "AUTH_TOKEN_FILE"] = str(Path(settings.auth_token_file).resolve())
    return env


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def sidecar_child(settings: Settings) -> Iterator[Settings]:
    """Start the child, wait until it answers, yield the settings that proxy to it; stop it after."""
    if settings.http_port == 0:
        raise OSError("--adapters needs a fixed --http-port: its sidecar calls the server there")
    port = _free_port()
    cmd = [sys.executable, "-m", "meshserve.server.cli", "adapters"]
    proc = subprocess.Popen(cmd, env=child_env(settings, port), stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                raise OSError(f"the adapters sidecar exited with code {proc.returncode} at start")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise OSError(f"the adapters sidecar did not answer on {url} within {START_SECONDS}s") from None
                time.sleep(0.05)
        yield settings.model_copy(update={"adapters_url": url})
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
