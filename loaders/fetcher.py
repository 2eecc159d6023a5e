"""One entry point for every model URI: local paths as they are, remote ones via the cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from meshserve.loaders.cache import ContentCache
from meshserve.loaders.oci import RegistryClient
from meshserve.loaders.pull import pull
from meshserve.loaders.remote import fetch_http, fetch_s3
from meshserve.loaders.resolve import UnsupportedURI, resolve_uri
from meshserve.protocol.errors import ModelLoadError

REMOTE_SCHEMES = ("http", "https", "s3", "oci")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshserve"


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in REMOTE_SCHEMES


class ModelFetcher:
    """Fetches model URIs into a shared content cache (created on first remote use)."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        cache_max_bytes: int | None = None,
        insecure: bool | list[str] = False,
        credentials: tuple[str, str] | None = None,
        platform: str = "linux/amd64",
        s3_endpoint: str | None = None,
        offline_first: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_max_bytes = cache_max_bytes
        self.insecure = insecure
        self.credentials = credentials
        self.platform = platform
        self.s3_endpoint = s3_endpoint
        self.offline_first = offline_first
        self._cache: ContentCache | None = None

    @property
    def cache(self) -> ContentCache:
        if self._cache is None:
            self._cache = ContentCache(self.cache_dir, self.cache_max_bytes)
        return self._cache

    def client_for(self, registry: str) -> RegistryClient:
        insecure = self.insecure if isinstance(self.insecure, bool) else registry in self.insecure
        return RegistryClient(registry, insecure=insecure, credentials=self.credentials)

    def fetch(self, uri: str, base_dir: Path | None = None, progress: Callable[[int], None] | None = None) -> Path:
        """A local directory (or file) holding ``uri``; errors name the URI and the cause."""
        try:
            return self._fetch(uri, base_dir, progress)
        except ModelLoadError as e:
            if uri in e.message:
                raise
            raise type(e)(f"{uri}: {e.message}") from None

    def _fetch(self, uri: str, base_dir: Path | None, progress: Callable[[int], None] | None) -> Path:
        scheme = urlparse(uri).scheme
        if scheme in ("http", "https"):
            return fetch_http(uri, self.cache, self.offline_first, progress)
        if scheme == "s3":
            return fetch_s3(uri, self.cache, self.s3_endpoint, self.offline_first, progress)
        if scheme == "oci":
            return pull(uri, self.cache, self.client_for, self.platform, self.offline_first, progress)
        if scheme not in ("", "file") and not (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
            raise UnsupportedURI(f"URI scheme {scheme!r} is not supported (file, http(s), s3, oci)")
        return resolve_uri(uri, base_dir)
