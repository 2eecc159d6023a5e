"""http(s):// and s3:// sources, fetched into the content cache.

An http(s) URI names a file or an archive (.tar, .tar.gz, .tgz, .zip); it is
streamed to disk while hashed, and the unpacked tree is keyed by that digest.
An s3://bucket/prefix is keyed by its listing (keys, ETags, sizes), so an
unchanged prefix is never downloaded twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from meshserve.loaders.archive import extract_zip, member_path, safe_relative
from meshserve.loaders.cache import ContentCache
from meshserve.loaders.limits import LoadBudget
from meshserve.loaders.tarstream import extract_chunks, gunzip
from meshserve.protocol.errors import ModelLoadError

log = logging.getLogger(__name__)
ARCHIVES = {".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz", ".zip": "zip"}


def _archive_kind(name: str) -> str | None:
    lower = name.lower()
    return next((kind for suffix, kind in ARCHIVES.items() if lower.endswith(suffix)), None)


def _file_chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def fetch_http(
    uri: str,
    cache: ContentCache,
    offline_first: bool = True,
    progress: Callable[[int], None] | None = None,
    timeout: float = 60.0,
    budget: LoadBudget | None = None,
) -> Path:
    """Credentials in the URI (user:password@) go to its host only: httpx drops the
    Authorization header on a redirect to another origin."""
    budget = budget or LoadBudget()
    if offline_first and (known := cache.ref(uri)) and (hit := cache.get(known)) is not None:
        return hit
    name = Path(unquote(urlparse(uri).path)).name or "model"
    download = cache.root / "tmp" / f"download-{os.getpid()}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    digest = hashlib.sha256()
    try:
        try:
            with httpx.stream("GET", uri, timeout=timeout, follow_redirects=True) as r:
                if r.status_code != 200:
                    raise ModelLoadError(f"{uri}: HTTP {r.status_code}")
                declared = r.headers.get("content-length", "")
                if declared.isdigit():
                    budget.expect_download(int(declared), name)
                with open(download, "wb") as f:
                    for chunk in r.iter_bytes():  # as they arrive: a trickle still meets the cancel check
                        budget.download(len(chunk), name)
                        digest.update(chunk)
                        f.write(chunk)
                        if progress:
                            progress(len(chunk))
        except httpx.HTTPError as e:
            known = cache.ref(uri)
            if known and (hit := cache.get(known)) is not None:
                log.warning("%s unreachable (%s); serving the cached copy", uri, e)
                return hit
            raise ModelLoadError(f"{uri} unreachable: {type(e).__name__}: {e}") from None
        key = "sha256:" + digest.hexdigest()

        def produce(tmp: Path) -> None:
            kind = _archive_kind(name)
            if kind == "zip":
                extract_zip(download, tmp, budget)
            elif kind:
                chunks = _file_chunks(download)
                extract_chunks(gunzip(chunks) if kind == "tar.gz" else chunks, tmp, budget=budget)
            else:
                shutil.copyfile(download, tmp / name)

        path = cache.fill(key, produce)
        cache.set_ref(uri, key)
        return path
    finally:
        download.unlink(missing_ok=True)


def fetch_s3(
    uri: str,
    cache: ContentCache,
    endpoint_url: str | None = None,
    offline_first: bool = True,
    progress: Callable[[int], None] | None = None,
    budget: LoadBudget | None = None,
) -> Path:
    """Requests go to ``endpoint_url`` (or AWS) only: the URI names a bucket, never a host,
    so the AWS credentials reach no other server."""
    budget = budget or LoadBudget()
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise ModelLoadError(f"{uri}: no bucket (s3://bucket/prefix)")
    if offline_first and (known := cache.ref(uri)) and (hit := cache.get(known)) is not None:
        return hit
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60),
    )
    try:
        objects: list[dict[str, Any]] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except (BotoCoreError, ClientError) as e:
        known = cache.ref(uri)
        if known and (hit := cache.get(known)) is not None:
            log.warning("%s unreachable (%s); serving the cached copy", uri, e)
            return hit
        raise ModelLoadError(f"{uri}: {type(e).__name__}: {e}") from None
    if not objects:
        raise ModelLoadError(f"{uri}: no objects under that prefix")
    listing = sorted((o["Key"], o.get("ETag", ""), o["Size"]) for o in objects)
    budget.expect_download(sum(int(size) for _, _, size in listing), f"s3://{bucket}/{prefix}")
    key = "sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    if not prefix or prefix.endswith("/"):
        base = prefix
    elif any(o["Key"].startswith(prefix + "/") for o in objects):
        base = prefix + "/"  # a "folder"
    else:
        base = prefix.rpartition("/")[0] + "/" if "/" in prefix else ""  # one object, or a name prefix

    def produce(tmp: Path) -> None:
        for obj_key, _, _ in listing:
            rel = safe_relative(obj_key[len(base) :] if obj_key.startswith(base) else obj_key, None)
            if rel is None:
                continue
            dest = member_path(tmp, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)

            def counted(n: int, key: str = obj_key) -> None:
                budget.download(n, key)  # a server sending more than it listed stops here
                if progress:
                    progress(n)

            try:
                s3.download_file(bucket, obj_key, str(dest), Callback=counted)
            except (BotoCoreError, ClientError) as e:
                raise ModelLoadError(f"{uri}: downloading {obj_key}: {e}") from None

    path = cache.fill(key, produce)
    cache.set_ref(uri, key)
    return path
