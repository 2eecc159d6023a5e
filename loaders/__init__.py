"""Model URIs to local directories."""

from loaders.resolve import UnsupportedURI, resolve_uri

__all__ = ["UnsupportedURI", "resolve_uri"]
