"""A client for OCI registries (the distribution HTTP API): resolve, stream, push.

Written on httpx rather than oras-py: pulling a modelcar means streaming each
layer through a digest check straight into a tar extractor that keeps only
``models/``, and picking a platform out of an image index; oras-py's pull saves
whole blobs as titled files and knows neither. Its push holds blobs in memory
unless chunked, and cannot write an image config with diff_ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from meshserve.protocol.errors import ModelLoadError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CHUNK = 1024 * 1024

_REF = re.compile(
    r"^(?:oci://)?(?P<registry>[^/]+)/(?P<repo>[a-z0-9._/-]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[a-z0-9]+:[a-f0-9]{32,}))?$"
)


class RegistryError(ModelLoadError):
    pass


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Reference:
        m = _REF.match(uri)
        if m is None:
            raise RegistryError(f"{uri!r} is not an OCI reference (oci://registry/repository[:tag][@digest])")
        tag, digest = m["tag"], m["digest"]
        return cls(m["registry"], m["repo"], tag if tag or digest else "latest", digest)

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tail = (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        return f"oci://{self.registry}/{self.repository}{tail}"


DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


def registry_host(key: str) -> str:
    """The host[:port] a credential is for, as docker's config.json keys name it
    (``https://index.docker.io/v1/``, ``http://host:5000``, ``host:5000``)."""
    host = key.strip().lower()
    host = host.split("://", 1)[1] if "://" in host else host
    host = host.split("/", 1)[0]
    return "docker.io" if host in DOCKER_HUB else host


def auth_entry(entry: Any) -> tuple[str, str] | None:
    """(user, password) from a config.json ``auths`` entry: ``auth`` (base64 user:password) or fields."""
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user, password
    if entry.get("username"):
        return str(entry["username"]), str(entry.get("password", ""))
    return None


def docker_credentials(registry: str, config_path: Path | None = None) -> tuple[str, str] | None:
    """user, password for exactly ``registry`` (host[:port]) from a docker config.json
    ($DOCKER_CONFIG or ~/.docker); an entry for another host, or port, never applies."""
    if config_path is None:
        base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
        config_path = Path(base) / "config.json"
    try:
        auths = json.loads(config_path.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    wanted = registry_host(registry)
    for key, entry in auths.items() if isinstance(auths, dict) else ():
        if registry_host(key) == wanted and (found := auth_entry(entry)) is not None:
            return found
    return None


class VerifyingReader:
    """A file-like view of a blob download that hashes as it goes and refuses to read past
    the size the manifest declared; ``finish`` checks the digest once the stream ends."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        digest: str,
        size: int,
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        algo, _, self._expected = digest.partition(":")
        if algo != "sha256":
            raise RegistryError(f"{what}: unsupported digest algorithm {algo!r}")
        self._hash = hashlib.sha256()
        self._chunks = chunks
        self._chunk = b""
        self._pos = 0
        self._size = size
        self._seen = 0
        self._what = what
        self._progress = progress
        self._checked_upstream = False

    @classmethod
    def prefetching(
        cls, chunks: Iterator[bytes], digest: str, size: int, what: str, progress: Callable[[int], None] | None = None
    ) -> VerifyingReader:
        """A reader whose chunks are fetched, counted and hashed on a thread, ahead of the
        consumer (which inflates and writes): both release the GIL, so two cores overlap."""
        reader = cls(iter(()), digest, size, what, progress)
        reader._chunks = prefetched(chunks, reader.check)
        reader._checked_upstream = True
        return reader

    def check(self, chunk: bytes) -> None:
        """Count and hash one chunk (called as chunks arrive, possibly on the prefetch thread)."""
        self._seen += len(chunk)
        if self._seen > self._size:
            raise RegistryError(f"{self._what} is larger than the {self._size} bytes its manifest declares")
        self._hash.update(chunk)
        if self._progress:
            self._progress(len(chunk))

    def _next(self) -> bytes:
        for chunk in self._chunks:
            if chunk:
                if not self._checked_upstream:
                    self.check(chunk)
                return chunk
        return b""

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, copying only what is returned (no re-slicing of the buffer)."""
        if self._pos >= len(self._chunk):
            self._chunk, self._pos = self._next(), 0
            if not self._chunk:
                return b""
        if n is None or n < 0:
            parts = [self._chunk[self._pos :]]
            while chunk := self._next():
                parts.append(chunk)
            self._chunk, self._pos = b"", 0
            return b"".join(parts)
        if self._pos == 0 and n >= len(self._chunk):
            out, self._chunk = self._chunk, b""
            return out
        out = self._chunk[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def chunks(self) -> Iterator[bytes]:
        """The rest of the blob as it arrives (after whatever ``read`` consumed)."""
        if self._pos < len(self._chunk):
            yield self._chunk[self._pos :]
        self._chunk, self._pos = b"", 0
        while chunk := self._next():
            yield chunk

    def readinto(self, buffer: memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        while self._next():
            pass
        if self._seen != self._size:
            raise RegistryError(f"{self._what} is {self._seen} bytes, its manifest declares {self._size}")
        if self._hash.hexdigest() != self._expected:
            raise RegistryError(f"{self._what} does not match its digest sha256:{self._expected}")


def prefetched(chunks: Iterator[bytes], on_chunk: Callable[[bytes], None], depth: int = 8) -> Iterator[bytes]:
    """Read ``chunks`` on a thread, passing each to ``on_chunk`` there, at most ``depth`` ahead
    of the consumer (bounded memory)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def pump() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                if chunk:
                    on_chunk(chunk)
                    q.put(chunk)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=pump, daemon=True, name="blob-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                if isinstance(item, httpx.HTTPError):
                    raise RegistryError(f"download interrupted: {type(item).__name__}: {item}") from None
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pump waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


class RegistryClient:
    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        credentials: tuple[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        self.base = f"{'http' if insecure else 'https'}://{registry}"
        self.credentials = credentials if credentials is not None else docker_credentials(registry)
        self.http = httpx.Client(timeout=timeout, follow_redirects=True)
        self._token: str | None = None
        self.requests = 0

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests with auth -------------------------------------------------------
    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        elif self.credentials:
            user, pw = self.credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        return headers

    def _send(
        self, method: str, url: str, headers: dict[str, str] | None = None, stream: bool = False, **kw: Any
    ) -> httpx.Response:
        if not url.startswith("http"):
            url = self.base + url
        for attempt in range(2):
            self.requests += 1
            try:
                req = self.http.build_request(method, url, headers=self._headers(headers), **kw)
                resp = self.http.send(req, stream=stream)
            except httpx.HTTPError as e:
                hint = ""
                if "WRONG_VERSION_NUMBER" in str(e) and self.base.startswith("https"):
                    hint = " (a plain-http registry? allow it with --insecure or insecure_registries)"
                raise RegistryError(f"registry {self.registry} unreachable: {type(e).__name__}: {e}{hint}") from None
            if resp.status_code != 401 or attempt:
                break
            challenge = resp.headers.get("www-authenticate", "")
            resp.close()
            if not self._authenticate(challenge):
                break
        if resp.status_code == 401:
            resp.close()
            who = "with the configured credentials" if self.credentials else "without credentials"
            raise RegistryError(f"registry {self.registry} refused access (401 unauthorized) {who}")
        return resp

    def _authenticate(self, challenge: str) -> bool:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            return self.credentials is not None and self._token is None
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", None)
        if not realm:
            return False
        auth = httpx.BasicAuth(*self.credentials) if self.credentials else None
        try:
            r = self.http.get(realm, params=fields, auth=auth)
        except httpx.HTTPError as e:
            raise RegistryError(f"token service {realm} unreachable: {e}") from None
        if r.status_code != 200:
            return False
        body = r.json()
        self._token = body.get("token") or body.get("access_token")
        return bool(self._token)

    # -- pulling ---------------------------------------------------------------------
    def manifest(self, repository: str, reference: str) -> tuple[str, str, dict[str, Any]]:
        """(digest, media type, manifest) for a tag or digest, checking the digest of what came back."""
        r = self._send("GET", f"/v2/{repository}/manifests/{reference}", {"Accept": ACCEPT})
        if r.status_code == 404:
            raise RegistryError(f"oci://{self.registry}/{repository}:{reference} not found")
        if r.status_code != 200:
            raise RegistryError(
                f"registry {self.registry} answered {r.status_code} for manifest {reference}: {r.text[:200]}"
            )
        body = r.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"manifest {reference} does not match its digest")
        doc = json.loads(body)
        media_type = doc.get("mediaType") or r.headers.get("content-type", "").split(";")[0]
        return digest, media_type, doc

    def image_manifest(self, ref: Reference, platform: str = "linux/amd64") -> tuple[str, dict[str, Any]]:
        """The image manifest for ``ref``, choosing ``platform`` from an index."""
        digest, media_type, doc = self.manifest(ref.repository, ref.reference)
        if media_type in INDEX_TYPES or "manifests" in doc:
            os_, _, arch = platform.partition("/")
            choices = doc.get("manifests", [])
            match = [
                m
                for m in choices
                if m.get("platform", {}).get("os") == os_ and m.get("platform", {}).get("architecture") == arch
            ]
            if not match and len(choices) == 1:
                match = choices
            if not match:
                found = [
                    f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}" for m in choices
                ]
                raise RegistryError(f"{ref} has no {platform} image (it has {', '.join(found) or 'none'})")
            digest, _, doc = self.manifest(ref.repository, match[0]["digest"])
        return digest, doc

    def open_blob(self, repository: str, descriptor: dict[str, Any], progress: Callable[[int], None] | None = None):
        """A context manager yielding a VerifyingReader over the blob's bytes."""
        client = self

        class _Blob:
            def __enter__(self) -> VerifyingReader:
                self.resp = client._send("GET", f"/v2/{repository}/blobs/{descriptor['digest']}", stream=True)
                if self.resp.status_code != 200:
                    self.resp.close()
                    raise RegistryError(f"blob {descriptor['digest']} of {repository}: HTTP {self.resp.status_code}")
                return VerifyingReader.prefetching(
                    self.resp.iter_raw(CHUNK),
                    descriptor["digest"],
                    int(descriptor["size"]),
                    f"blob {descriptor['digest'][:19]}",
                    progress,
                )

            def __exit__(self, *exc: object) -> None:
                self.resp.close()

        return _Blob()

    # -- pushing --------------------------------------------------------------------
    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self._send("HEAD", f"/v2/{repository}/blobs/{digest}")
        return r.status_code == 200

    def push_blob(
        self,
        repository: str,
        source: IO[bytes],
        digest: str,
        size: int,
        progress: Callable[[int], None] | None = None,
        chunk_size: int = 8 * CHUNK,
    ) -> None:
        """Chunked upload: POST, PATCH per chunk (never the whole blob in memory), PUT with the digest."""
        if self.blob_exists(repository, digest):
            if progress:
                progress(size)
            return
        r = self._send("POST", f"/v2/{repository}/blobs/uploads/")
        if r.status_code != 202:
            raise RegistryError(
                f"registry {self.registry} refused an upload to {repository}: HTTP {r.status_code} {r.text[:200]}"
            )
        location = r.headers["location"]
        offset = 0
        while chunk := source.read(chunk_size):
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            }
            r = self._send("PATCH", self._absolute(location), headers, content=chunk)
            if r.status_code != 202:
                raise RegistryError(f"upload of {digest} failed at byte {offset}: HTTP {r.status_code} {r.text[:200]}")
            location = r.headers["location"]
            offset += len(chunk)
            if progress:
                progress(len(chunk))
        sep = "&" if "?" in location else "?"
        r = self._send("PUT", self._absolute(location) + f"{sep}digest={digest}")
        if r.status_code != 201:
            raise RegistryError(f"upload of {digest} was not accepted: HTTP {r.status_code} {r.text[:200]}")

    def _absolute(self, location: str) -> str:
        return location if location.startswith("http") else self.base + location

    def push_manifest(self, repository: str, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        r = self._send("PUT", f"/v2/{repository}/manifests/{reference}", {"Content-Type": media_type}, content=body)
        if r.status_code not in (200, 201):
            raise RegistryError(
                f"manifest push to {repository}:{reference} failed: HTTP {r.status_code} {r.text[:200]}"
            )
        return "sha256:" + hashlib.sha256(body).hexdigest()
