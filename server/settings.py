"""Server settings from flags, MESHSERVE_* environment variables and a config file.

Precedence: flags, then environment, then the config file, then defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meshserve.protocol.datatypes import MAX_BYTES_ELEMENTS
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from meshserve.loaders import ModelFetcher


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_", extra="forbid")

    host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_port: int = Field(default=8081, ge=0, le=65535)
    model_dir: Path | None = None
    # Models listed inline: each a model-settings document with a ``uri``.
    models: list[dict[str, Any]] = []
    max_request_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # BYTES elements one infer request may hold (413 / RESOURCE_EXHAUSTED past it): each is a
    # Python bytes object of ~64 bytes in memory, however few it takes on the wire.
    max_bytes_elements: int = Field(default=MAX_BYTES_ELEMENTS, ge=1)
    predict_threads: int = Field(default=min(32, (os.cpu_count() or 1) + 4), ge=1)
    strict_readiness: bool = True
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # After SIGTERM: seconds not-ready but still accepting (endpoints need time to drop the pod).
    drain_seconds: float = Field(default=0.0, ge=0)
    # The model cache (modelmesh): bytes of models one pod may hold; None: from the
    # container's memory limit (cgroup) or the machine's memory, times capacity_fraction.
    capacity_bytes: int | None = Field(default=None, ge=1)
    capacity_fraction: float = Field(default=0.7, gt=0, le=1)
    # A model is not evicted if it was used this recently (ModelMesh's minChurnAgeMs);
    # a cold request then waits for one to age out or finish its requests.
    min_churn_age_seconds: float = Field(default=1.0, ge=0)
    # How long a load waits for room before 503 "capacity exhausted" (with Retry-After).
    capacity_wait_seconds: float = Field(default=5.0, ge=0)
    # Predicted size of a model whose files say little (python models): a floor.
    default_model_bytes: int = Field(default=256 * 1024, ge=0)
    # Added to every model's size: its code, objects and allocator slack, which a
    # runtime's own figure (its tensors) leaves out. Measured at ~50 KiB per small model.
    model_overhead_bytes: int = Field(default=64 * 1024, ge=0)
    # Added instead to a size meshserve measured itself (a model without ``size_bytes``):
    # the measurement counts the model's objects already, this is the server's own cost per
    # model and allocator slack. Measured at ~20 KiB per tiny numpy model (loadtests/mesh_memory.py).
    measured_overhead_bytes: int = Field(default=24 * 1024, ge=0)
    load_timeout_seconds: float | None = Field(default=300.0, gt=0)
    load_retry_seconds: float = Field(default=1.0, gt=0)
    load_retry_max_seconds: float = Field(default=60.0, gt=0)
    # Load models at start while they fit without evicting (pinned ones always).
    preload: bool = True
    # Remote model URIs (http(s), s3, oci) are fetched into this content-addressed cache.
    cache_dir: Path | None = None  # default: $XDG_CACHE_HOME/meshserve or ~/.cache/meshserve
    cache_max_bytes: int | None = Field(default=None, ge=0)
    # Registries reached over plain http: a list of host[:port], or true for all.
    insecure_registries: bool | list[str] = False
    registry_username: str | None = None
    registry_password: str | None = None  # else a docker config.json ($DOCKER_CONFIG)
    # The registry host[:port] registry_username/password are for: no other registry gets them.
    registry_credentials_host: str | None = None
    # More registries, as docker's config.json auths: {host[:port]: {username, password} or {auth}}.
    registry_auths: dict[str, dict[str, str]] = {}
    # What one remote model may download, and unpack, in bytes (a gzip or zip bomb stops
    # at the limit); None: the cache capacity (capacity_bytes, else its default).
    max_model_bytes: int | None = Field(default=None, ge=1)
    # Loads and fetches run on their own threads, so a stuck load never holds a predict thread.
    load_threads: int = Field(default=4, ge=1)
    oci_platform: str = "linux/amd64"
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL
    # The fleet (modelmesh/store.py): None is one pod with an in-process store;
    # etcd://host:port/prefix joins the pods sharing that etcd prefix into one mesh.
    store: str | None = None
    store_fallback_local: bool = False  # etcd unreachable at start: serve as one pod instead of exiting
    pod_id: str | None = None  # default: hostname and gRPC port
    advertise_host: str | None = None  # how other pods reach this one; default: host, or this host's address
    fleet_lease_seconds: float = Field(default=10.0, ge=1)
    # ModelMesh's copy rules: a second copy once a model is still used this long after it
    # loaded, and one more whenever a copy serves more than copy_rate_per_minute.
    second_copy_after_seconds: float = Field(default=420.0, ge=0)
    copy_rate_per_minute: float = Field(default=2000.0, gt=0)
    max_copies: int = Field(default=3, ge=1)
    forward_timeout_seconds: float = Field(default=120.0, gt=0)
    log_level: str = "info"
    # Training, tuning, workflow and event adapters under /v1/adapters (adapters/):
    # off by default, as they start processes and accept webhooks. Their own settings:
    # adapters_config (a mapping) or MESHSERVE_ADAPTERS_* variables.
    adapters: bool = False
    adapters_config: dict[str, Any] = {}
    # An adapters sidecar (``meshserve adapters``) to proxy /v1/adapters/* to; --adapters
    # starts one as a child and sets this.
    adapters_url: str | None = None
    server_name: str = "meshserve"
    # Production (docs/operations/production.md): logs, auth, TLS, timeouts, CORS, workers, tracing.
    log_format: Literal["text", "json"] = "text"
    # Per-request access lines: every request ("all"), only those that failed ("errors": 4xx/5xx,
    # gRPC codes but OK; the default, as Triton writes none per request), or none ("off").
    access_log: Literal["all", "errors", "off"] = "errors"
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None  # one token per line
    auth_health: bool = False  # require the token on /v2/health/* and gRPC ServerLive/Ready too
    auth_metrics: bool = False
    tls_cert: Path | None = None  # PEM; with tls_key, REST and gRPC both serve TLS
    tls_key: Path | None = None
    request_timeout_seconds: float | None = Field(default=None, gt=0)  # whole request: 504 / DEADLINE_EXCEEDED
    body_timeout_seconds: float = Field(default=30.0, gt=0)  # a client must send its body within this: 408
    cors_origins: list[str] | str = []  # CORS off unless origins are listed ("*" for any)
    # REST: 503 past this many open connections. A bound by default: every connection holds
    # a socket and buffers, and a flood must meet a wall before the file-descriptor limit
    # (often 1024) does; 1000 is far above what one process serves at once.
    max_connections: int | None = Field(default=1000, ge=1)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # REST request line + headers: 431 past it
    # A connection must finish its request head within this (from its first byte, or from
    # opening): else it is closed. Idle keep-alive connections are closed after keepalive_timeout.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=5.0, gt=0)
    workers: int = Field(default=1, ge=1)
    # With workers: a model arriving at a worker that does not own it this often (requests/s)
    # gets a copy there, if no bigger than worker_copy_max_bytes and it fits without evicting
    # (server/worker_copies.py). 0: every request for another worker's model is forwarded.
    worker_copy_rate: float = Field(default=5.0, ge=0)
    worker_copy_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Where a repository load's config may point its uri: inside model_dir (default), anywhere
    # (remote uris: needs an auth token), or nowhere. docs/operations/security.md.
    repository_uris: Literal["any", "model-dir", "none"] = "model-dir"
    # Repository loads may name code (module import paths, files outside the model's folder,
    # trust_remote_code): off by default; needs an auth token.
    repository_code: bool = False
    tracing: bool = False  # OpenTelemetry spans (the `otel` extra); off: no cost
    trace_probes: bool = False  # also spans for health probes, /metrics and ASGI internals (noise)

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, str) and v.lower() in ("true", "false", "1", "0")):
            return "all" if v in (True, "true", "1", "True") else "off"  # the earlier on/off setting
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            return json.loads(text) if text.startswith("[") else [o.strip() for o in text.split(",") if o.strip()]
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v and v != "inprocess":
            from meshserve.modelmesh.store import parse_store_url

            parse_store_url(v)  # ValueError: the settings error says what is wrong
        return v

    @field_validator("insecure_registries", mode="before")
    @classmethod
    def _registries(cls, v: Any) -> Any:
        """From the environment: true/false, a JSON list, or host:port,host:port."""
        if isinstance(v, str):
            text = v.strip()
            if text.lower() in ("true", "1", "yes", "false", "0", "no", ""):
                return text.lower() in ("true", "1", "yes")
            if text.startswith("["):
                return json.loads(text)
            return [h.strip() for h in text.split(",") if h.strip()]
        return v

    @model_validator(mode="after")
    def _scoped_credentials(self) -> Settings:
        if self.registry_username and not self.registry_credentials_host:
            raise ValueError(
                "registry_username needs registry_credentials_host: the registry host[:port] it is for "
                "(credentials are never sent to a registry they were not configured for)"
            )
        from meshserve.loaders.oci import auth_entry

        for host, entry in self.registry_auths.items():
            if auth_entry(entry) is None:
                raise ValueError(f"registry_auths[{host!r}] needs username and password, or auth")
        return self

    def model_bytes_limit(self) -> int:
        """max_model_bytes, or the cache capacity when unset."""
        if self.max_model_bytes is not None:
            return self.max_model_bytes
        from meshserve.server.capacity import default_capacity

        return self.capacity_bytes or default_capacity(self.capacity_fraction)

    def fetcher(self) -> ModelFetcher:
        """The model fetcher these settings describe."""
        from meshserve.loaders import ModelFetcher
        from meshserve.loaders.oci import auth_entry

        auths = {host: auth for host, entry in self.registry_auths.items() if (auth := auth_entry(entry))}
        if self.registry_username and self.registry_credentials_host:
            auths[self.registry_credentials_host] = (self.registry_username, self.registry_password or "")
        return ModelFetcher(
            self.cache_dir,
            self.cache_max_bytes,
            self.insecure_registries,
            auths,
            self.oci_platform,
            self.s3_endpoint,
            max_model_bytes=self.model_bytes_limit(),
        )

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings; ``overrides`` (from flags) win over env, env over the file."""
        config_file = config_file or os.environ.get("MESHSERVE_CONFIG")
        file_values = read_config_file(Path(config_file)) if config_file else {}
        from_env = cls()
        env_values = {k: getattr(from_env, k) for k in from_env.model_fields_set}
        explicit = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**file_values, **env_values, **explicit})


def read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        doc = json.loads(text)
    else:
        import yaml

        doc = yaml.safe_load(text) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    return doc
