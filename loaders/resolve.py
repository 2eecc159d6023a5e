"""Local model URIs: ``file://`` and plain paths (remote ones: meshserve.loaders.fetcher)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from meshserve.protocol.errors import InvalidInput, ModelLoadError

SUPPORTED_FORMS = "a path, file://, http(s)://, s3://bucket/prefix or oci://registry/repository:tag"
REMOTE_SCHEMES = ("http", "https", "s3", "oci")
# What a person types for an image: host[:port]/repository[:tag][@digest], the host with a dot or a port.
_IMAGE_REF = re.compile(
    r"^(?P<host>localhost(:\d+)?|[a-z0-9-]+(\.[a-z0-9-]+)+(:\d+)?|[a-z0-9-]+:\d+)/[a-z0-9._/-]+"
    r"(:[\w][\w.-]{0,127})?(@[a-z0-9]+:[a-f0-9]{32,})?$"
)
_SCHEME_HINTS = {
    "hf": "download it first (huggingface-cli download REPO --local-dir DIR) and serve that folder",
    "gs": "serve it from an http(s) URL (a signed or public storage.googleapis.com link) or an S3-compatible bucket",
    "docker": "use oci://registry/repository:tag",
}


class UnsupportedURI(ModelLoadError):
    """A URI no loader takes: a mistake in what was asked, so 400 / INVALID_ARGUMENT."""

    http_status = InvalidInput.http_status
    grpc_code = InvalidInput.grpc_code


def is_local_form(uri: str) -> bool:
    """A plain path, ``file://`` or a Windows drive path."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/"))


def oci_suggestion(uri: str) -> str | None:
    """``oci://`` + ``uri`` when ``uri`` reads as an image reference typed without its scheme."""
    return f"oci://{uri}" if _IMAGE_REF.match(uri) else None


def unsupported_uri_message(uri: str) -> str:
    """Why ``uri`` cannot be loaded and what to write instead (one line)."""
    suggestion = oci_suggestion(uri)
    if suggestion is not None:
        return f"{uri!r} has no URI scheme a loader takes; for an OCI image write {suggestion}"
    scheme = urlparse(uri).scheme
    hint = _SCHEME_HINTS.get(scheme.lower())
    text = f"{uri!r}: URI scheme {scheme!r} is not supported: use {SUPPORTED_FORMS}"
    return f"{text}; {hint}" if hint else text


def check_uri_form(uri: str) -> None:
    """Refuse, before any work, a URI that no loader takes (raises UnsupportedURI)."""
    if not is_local_form(uri) and urlparse(uri).scheme not in REMOTE_SCHEMES:
        raise UnsupportedURI(unsupported_uri_message(uri))


def check_oci_tag(tag: str) -> None:
    """``modelcar build --tag`` takes the form ``pull`` takes: ``oci://registry/repository:tag``."""
    if not tag.startswith("oci://"):
        suggestion = oci_suggestion(tag)
        raise UnsupportedURI(
            f"--tag {tag!r} must be an OCI reference like oci://registry/repository:tag"
            + (f"; write {suggestion}" if suggestion else "")
        )


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
        suggestion = oci_suggestion(uri)
        hint = f" (for an OCI image write {suggestion})" if suggestion else ""
        raise ModelLoadError(f"model path {path} does not exist{hint}")
    return path.resolve()
