"""Model URIs to local directories: paths, http(s), s3 and OCI modelcar images,
through a content-addressed cache."""

from loaders.fetcher import ModelFetcher, is_remote
from loaders.resolve import UnsupportedURI, resolve_uri

__all__ = ["ModelFetcher", "UnsupportedURI", "is_remote", "resolve_uri"]
