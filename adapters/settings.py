"""Adapter settings: ``MESHSERVE_ADAPTERS_*`` environment variables, or the
``adapters_config`` mapping of the server's settings (file or flags)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshserve" / "adapters"


class AdaptersSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_ADAPTERS_", extra="forbid")

    # Jobs (sqlite), their logs and outputs live here.
    state_dir: Path = Field(default_factory=_default_state_dir)
    # Trained models are placed here and registered; default: the server's model_dir,
    # else state_dir/models.
    model_dir: Path | None = None
    # Training jobs running at once on this machine (each is N worker processes).
    max_running_trainings: int = Field(default=2, ge=1)
    # The GitHub webhook's shared secret; without one every delivery is refused.
    github_secret: SecretStr | None = None
    # The default freshness store: a file path (file://...) or etcd://host:port/key.
    cache_store: str | None = None
    # Scaled out: where to submit rendered resources (a kubeconfig file, or in-cluster).
    kubeconfig: Path | None = None
    in_cluster: bool = False
    namespace: str = "default"
    # The image rendered pods run (it must hold meshserve and the training code).
    image: str = "ghcr.io/meshserve/meshserve:latest"
    service_account: str = "meshserve-adapters"
    # Rendered resources: where GitHub reaches the EventSource, and the meshserve
    # service a rendered deploy step calls.
    webhook_url: str = "https://meshserve.example.com"
    server_url: str = "http://meshserve:8080"

    # The sidecar process (``meshserve adapters``): where it listens, the token(s) its
    # clients must send (a non-loopback bind needs one), and the model server it drives
    # through its public API (repository load/unload/index, infer).
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    model_server_url: str = "http://127.0.0.1:8080"
    model_server_token: SecretStr | None = None
    model_server_verify: bool = True  # TLS certificate check of model_server_url
    # Resume training jobs a restart interrupted from their last checkpoint (jobs may opt out).
    resume: bool = True
    # The package step: push modelcars to this registry over plain http (a loopback registry).
    registry_insecure: bool = False
    registry_username: str | None = None
    registry_password: SecretStr | None = None
