"""One entry point for every model URI: local paths as they are, remote ones via the cache."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from meshserve.loaders.cache import ContentCache
from meshserve.loaders.limits import LoadBudget
from meshserve.loaders.oci import RegistryClient, registry_host
from meshserve.loaders.pull import pull
from meshserve.loaders.remote import fetch_http, fetch_s3
from meshserve.loaders.resolve import REMOTE_SCHEMES, check_uri_form, resolve_uri
from meshserve.protocol.errors import ModelLoadError


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshserve"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in REMOTE_SCHEMES


class ModelFetcher:
    """Fetches model URIs into a shared content cache (created on first remote use).

    ``registry_auths`` maps a registry host[:port] to (user, password), as docker's
    config.json ``auths`` does: a URI naming another registry gets none of them (it may
    still find its own in $DOCKER_CONFIG/config.json). ``max_model_bytes`` caps what one
    fetch downloads and what it unpacks, counted while streaming."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        cache_max_bytes: int | None = None,
        insecure: bool | list[str] = False,
        registry_auths: Mapping[str, tuple[str, str]] | None = None,
        platform: str = "linux/amd64",
        s3_endpoint: str | None = None,
        offline_first: bool = True,
        max_model_bytes: int | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_max_bytes = cache_max_bytes
        self.insecure = insecure
        self.registry_auths = {registry_host(host): auth for host, auth in (registry_auths or {}).items()}
        self.platform = platform
        self.s3_endpoint = s3_endpoint
        self.offline_first = offline_first
        self.max_model_bytes = max_model_bytes
        self._cache: ContentCache | None = None

    @property
    def cache(self) -> ContentCache:
        if self._cache is None:
            self._cache = ContentCache(self.cache_dir, self.cache_max_bytes)
        return self._cache

    def client_for(self, registry: str) -> RegistryClient:
        insecure = self.insecure if isinstance(self.insecure, bool) else registry in self.insecure
        credentials = self.registry_auths.get(registry_host(registry))  # None: its docker config.json entry
        return RegistryClient(registry, insecure=insecure, credentials=credentials)

    def fetch(
        self,
        uri: str,
        base_dir: Path | None = None,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """A local directory (or file) holding ``uri``; errors name the URI and the cause.
        Setting ``cancel`` stops the fetch at its next chunk or archive member."""
        budget = LoadBudget(self.max_model_bytes, cancel)
        try:
            return self._fetch(uri, base_dir, progress, budget)
        except ModelLoadError as e:
            if uri in e.message:
                raise
            raise type(e)(f"{uri}: {e.message}") from None

    def _fetch(
        self, uri: str, base_dir: Path | None, progress: Callable[[int], None] | None, budget: LoadBudget
    ) -> Path:
        scheme = urlparse(uri).scheme
        if scheme in ("http", "https"):
            return fetch_http(uri, self.cache, self.offline_first, progress, budget=budget)
        if scheme == "s3":
            return fetch_s3(uri, self.cache, self.s3_endpoint, self.offline_first, progress, budget)
        if scheme == "oci":
            return pull(uri, self.cache, self.client_for, self.platform, self.offline_first, progress, budget)
        check_uri_form(uri)
        return resolve_uri(uri, base_dir)
