"""Model URIs to local directories: paths, http(s), s3 and OCI modelcar images,
through a content-addressed cache."""

from meshserve.loaders.fetcher import ModelFetcher, is_remote
from meshserve.loaders.resolve import UnsupportedURI, resolve_uri

__all__ = ["ModelFetcher", "UnsupportedURI", "is_remote", "resolve_uri"]
