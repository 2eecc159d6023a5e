"""http(s) and s3 sources against real servers on loopback, and the content cache."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from meshserve.loaders import ModelFetcher
from meshserve.loaders.archive import UnsafeArchive
from meshserve.loaders.cache import ContentCache
from meshserve.protocol.errors import ModelLoadError

from tests.loaders.conftest import model_tree, tree_of


def fetcher(tmp_path: Path, **kw) -> ModelFetcher:
    return ModelFetcher(cache_dir=tmp_path / "cache", **kw)


def test_http_file_tar_gz_and_zip(http_dir, tmp_path):
    root, base = http_dir
    src = model_tree(tmp_path / "src")
    with tarfile.open(root / "model.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")
    with zipfile.ZipFile(root / "model.zip", "w") as zf:
        for p in src.rglob("*"):
            zf.write(p, p.relative_to(src).as_posix())
    (root / "model.joblib").write_bytes(b"pickled")
    f = fetcher(tmp_path)
    assert tree_of(f.fetch(f"{base}/model.tar.gz")) == tree_of(src)
    assert tree_of(f.fetch(f"{base}/model.zip")) == tree_of(src)
    single = f.fetch(f"{base}/model.joblib")
    assert (single / "model.joblib").read_bytes() == b"pickled"
    # Same bytes under another name: one cache entry (content-addressed).
    (root / "copy.tar.gz").write_bytes((root / "model.tar.gz").read_bytes())
    assert f.fetch(f"{base}/copy.tar.gz") == f.fetch(f"{base}/model.tar.gz")


def test_http_errors_and_offline(http_dir, tmp_path):
    root, base = http_dir
    f = fetcher(tmp_path)
    with pytest.raises(ModelLoadError, match="HTTP 404"):
        f.fetch(f"{base}/absent.tar.gz")
    with pytest.raises(ModelLoadError, match="unreachable"):
        f.fetch("http://127.0.0.1:1/model.tar.gz")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    (root / "evil.zip").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchive):
        f.fetch(f"{base}/evil.zip")
    (root / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ModelLoadError, match="not a valid gzip"):
        f.fetch(f"{base}/bad.tar.gz")
    (root / "bad.tar").write_bytes(b"not a tarball" * 100)
    with pytest.raises(ModelLoadError, match="not a valid tar"):
        f.fetch(f"{base}/bad.tar")
    assert list((tmp_path / "cache" / "content").iterdir()) == []


def test_http_cached_copy_serves_when_the_server_is_gone(http_dir, tmp_path):
    root, base = http_dir
    (root / "m.joblib").write_bytes(b"v1")
    path = fetcher(tmp_path).fetch(f"{base}/m.joblib")
    (root / "m.joblib").unlink()
    assert fetcher(tmp_path).fetch(f"{base}/m.joblib") == path  # no request made: offline first


def test_s3_prefix_single_object_and_offline(s3_server, tmp_path, monkeypatch):
    import boto3

    endpoint, server = s3_server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="models")
    src = model_tree(tmp_path / "src")
    for p in src.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "models", f"iris/v1/{p.relative_to(src).as_posix()}")
    f = fetcher(tmp_path, s3_endpoint=endpoint)
    path = f.fetch("s3://models/iris/v1")
    assert tree_of(path) == tree_of(src)
    one = f.fetch("s3://models/iris/v1/README")
    assert (one / "README").read_bytes() == b"a test model\n"
    with pytest.raises(ModelLoadError, match="no objects"):
        f.fetch("s3://models/absent/")
    server.stop()
    assert fetcher(tmp_path, s3_endpoint=endpoint).fetch("s3://models/iris/v1") == path


def test_cache_is_atomic_shared_and_bounded(tmp_path):
    cache = ContentCache(tmp_path / "c", max_bytes=2500)

    def boom(tmp: Path) -> None:
        (tmp / "half").write_bytes(b"x" * 10)
        raise RuntimeError("crash mid-pull")

    with pytest.raises(RuntimeError):
        cache.fill("sha256:" + "a" * 64, boom)
    assert cache.get("sha256:" + "a" * 64) is None and list((tmp_path / "c" / "tmp").iterdir()) == []
    paths = []
    for i, ch in enumerate("bcd"):
        paths.append(cache.fill("sha256:" + ch * 64, lambda tmp: (tmp / "w").write_bytes(b"x" * 1000)))
        os.utime(paths[-1], (i, i))  # b oldest
    assert cache.get("sha256:" + "b" * 64) is None  # evicted when d arrived
    with cache.in_use(paths[1]):  # c in use: survives even though oldest now
        os.utime(paths[1], (0, 0))
        cache.fill("sha256:" + "e" * 64, lambda tmp: (tmp / "w").write_bytes(b"x" * 1000))
        assert paths[1].is_dir() and cache.get("sha256:" + "d" * 64) is None
    assert cache.size() <= 2500 + 1000
