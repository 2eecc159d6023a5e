"""Local model URIs: ``file://`` and plain paths (remote ones: meshserve.loaders.fetcher)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from meshserve.protocol.errors import ModelLoadError


class UnsupportedURI(ModelLoadError):
    pass


def resolve_uri(uri: str, base_dir: Path | None = None) -> Path:
    """A local path for ``uri``; relative paths are taken from ``base_dir``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedURI(f"file URI {uri!r} names a remote host")
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        path = Path(uri)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
    else:
        raise UnsupportedURI(f"URI scheme {parsed.scheme!r} is not a local path (use a path or file://)")
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    return path.resolve()
