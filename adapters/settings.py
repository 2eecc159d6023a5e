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
