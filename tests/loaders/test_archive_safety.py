"""Hostile archives: malformed PAX/GNU headers that used to spin the extractor for
ever, symlink chains that leave the tree, bombs (tar.gz, zip, OCI layers, plain
downloads) past max_model_bytes, and extractions that stop when cancelled."""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshserve.loaders import ModelFetcher
from meshserve.loaders.archive import UnsafeArchive, extract_zip
from meshserve.loaders.limits import LoadBudget, LoadCancelled, ModelTooLarge
from meshserve.loaders.oci import RegistryClient
from meshserve.loaders.tarstream import extract_chunks, gunzip
from meshserve.server.settings import Settings

from tests.loaders.test_oci import _member, _push_raw_image, _tar

MiB = 1024 * 1024


def _block(name: str, kind: bytes, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def _with_size_field(header: bytes, field: bytes) -> bytes:
    """A header with its 12-byte size field replaced and its checksum fixed."""
    h = bytearray(header[:512])
    h[124:136] = field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + header[512:]


def _file(name: str, data: bytes = b"ok") -> bytes:
    return _block(name, tarfile.REGTYPE, data)


END = bytes(1024)
MALFORMED = {
    "pax zero length": _block("p", tarfile.XHDTYPE, b"0 path=a\n") + _file("a") + END,
    "pax negative length": _block("p", tarfile.XHDTYPE, b"-9 path=a\n") + _file("a") + END,
    "pax length past header": _block("p", tarfile.XHDTYPE, b"99 path=a\n") + _file("a") + END,
    "pax no length": _block("p", tarfile.XHDTYPE, b" path=a\n") + _file("a") + END,
    "pax negative size": _block("p", tarfile.XHDTYPE, b"13 size=-512\n") + _file("a") + END,
    "gnu longname negative size": _with_size_field(_block("././@LongLink", tarfile.GNUTYPE_LONGNAME, b""), b"\xff" * 12)
    + _file("a")
    + END,
    "gnu longlink negative size": _with_size_field(_block("././@LongLink", tarfile.GNUTYPE_LONGLINK, b""), b"\xff" * 12)
    + _file("a")
    + END,
    "member negative size": _with_size_field(_file("a"), b"\xff" * 12) + END,
    "gnu longname too large": _with_size_field(
        _block("././@LongLink", tarfile.GNUTYPE_LONGNAME, b""), b"%011o\0" % 2**33
    )
    + END,
}


def _run_bounded(fn: Callable[[], object], seconds: float = 5.0) -> tuple[BaseException | None, float]:
    """Run ``fn`` on a daemon thread; fail if it is still running after ``seconds`` (a spin)."""
    result: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            result.append(None)
        except BaseException as e:  # the test inspects it
            result.append(e)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still extracting after {seconds}s: an endless loop"
    return result[0], time.monotonic() - started


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_refused_at_once(case, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    error, took = _run_bounded(lambda: extract_chunks(iter([MALFORMED[case]]), target))
    assert isinstance(error, UnsafeArchive), repr(error)
    assert took < 1.0
    print(f"{case}: refused in {took * 1000:.1f} ms")


def _symlink(name: str, link: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, link
    return info.tobuf(tarfile.USTAR_FORMAT)


def _hardlink(name: str, link: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, link
    return info.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    "members",
    [
        # Each link harmless when made; once "c" points to ".", "b" is the target's parent.
        [_symlink("b", "c/.."), _symlink("c", ".")],
        # "a" resolved through "b", which a later "c" moves up a level.
        [_symlink("b", "c/d/e"), _symlink("a", "b/../../secret"), _symlink("c", ".")],
        [_symlink("l", "..")],
        [_symlink("deep/l", "../../secret")],
        [_symlink("l", "/etc/passwd")],
        [_symlink("b", "c/.."), _symlink("c", "."), _hardlink("h", "b/secret")],
    ],
)
def test_link_chains_cannot_leave_the_folder(members, tmp_path):
    (tmp_path / "secret").write_text("outside")
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(UnsafeArchive):
        extract_chunks(iter([b"".join(members) + END]), target)
    for p in target.rglob("*"):  # what was made before the refusal (never published) stays inside
        assert p.resolve().is_relative_to(target.resolve()), p


def test_link_chain_over_http_leaves_nothing_in_the_cache(http_dir, tmp_path):
    root, base = http_dir
    (root / "chain.tar").write_bytes(_symlink("b", "c/..") + _symlink("c", ".") + _file("ok") + END)
    with pytest.raises(UnsafeArchive, match="outside"):
        ModelFetcher(cache_dir=tmp_path / "cache").fetch(f"{base}/chain.tar")
    assert list((tmp_path / "cache" / "content").iterdir()) == []


def test_links_inside_the_tree_still_work(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    tar = _file("blobs/w", b"weights") + _symlink("snap/w", "../blobs/w") + _hardlink("copy", "blobs/w") + END
    assert extract_chunks(iter([tar]), target) == 2
    assert (target / "snap" / "w").read_bytes() == (target / "copy").read_bytes() == b"weights"


def _bomb_tar(size: int) -> bytes:
    info = tarfile.TarInfo("zeros.bin")
    info.size = size
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


def _cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_tar_gz_and_zip_bombs_stop_at_max_model_bytes(http_dir, tmp_path):
    root, base = http_dir
    raw = _bomb_tar(64 * MiB)
    (root / "bomb.tar.gz").write_bytes(gzip.compress(raw, 9))
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(64 * MiB))
    assert (root / "bomb.tar.gz").stat().st_size < MiB and (root / "bomb.zip").stat().st_size < MiB
    fetcher = ModelFetcher(cache_dir=tmp_path / "cache", max_model_bytes=8 * MiB)
    for name in ("bomb.tar.gz", "bomb.zip"):
        started = time.monotonic()
        with pytest.raises(ModelTooLarge, match="max_model_bytes") as err:
            fetcher.fetch(f"{base}/{name}")
        print(f"{name}: 64 MiB refused in {(time.monotonic() - started) * 1000:.0f} ms")
        assert "--max-model-bytes" in err.value.message
        assert _cache_bytes(tmp_path / "cache") < 9 * MiB  # never unpacked past the limit
    assert list((tmp_path / "cache" / "content").iterdir()) == []


def test_plain_download_past_the_limit_is_refused(http_dir, tmp_path):
    root, base = http_dir
    (root / "big.bin").write_bytes(bytes(3 * MiB))
    fetcher = ModelFetcher(cache_dir=tmp_path / "cache", max_model_bytes=MiB)
    with pytest.raises(ModelTooLarge, match="to download"):
        fetcher.fetch(f"{base}/big.bin")  # Content-Length says so before a byte is read
    assert _cache_bytes(tmp_path / "cache") < MiB


def test_oci_layers_past_the_limit_are_refused(registry, tmp_path):
    with RegistryClient(registry.host, insecure=True) as client:
        _push_raw_image(client, "bomb/m", "1", _tar(_member("models/zeros"), data=bytes(32 * MiB)))
    uri = f"oci://{registry.host}/bomb/m:1"
    small = ModelFetcher(cache_dir=tmp_path / "c1", insecure=True, max_model_bytes=1000)
    with pytest.raises(ModelTooLarge, match="to download"):
        small.fetch(uri)  # the manifest's layer sizes already pass it
    inflating = ModelFetcher(cache_dir=tmp_path / "c2", insecure=True, max_model_bytes=4 * MiB)
    with pytest.raises(ModelTooLarge, match="unpack"):
        inflating.fetch(uri)
    assert _cache_bytes(tmp_path / "c2") < 5 * MiB
    assert ModelFetcher(cache_dir=tmp_path / "c3", insecure=True, max_model_bytes=64 * MiB).fetch(uri).is_dir()


def test_s3_prefix_past_the_limit_is_refused(s3_server, tmp_path, monkeypatch):
    import boto3

    endpoint, _ = s3_server
    for key, value in (("AWS_ACCESS_KEY_ID", "t"), ("AWS_SECRET_ACCESS_KEY", "t"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="models")
    for i in range(3):
        s3.put_object(Bucket="models", Key=f"m/part{i}", Body=bytes(MiB))
    fetcher = ModelFetcher(cache_dir=tmp_path / "cache", s3_endpoint=endpoint, max_model_bytes=2 * MiB)
    with pytest.raises(ModelTooLarge, match="max_model_bytes"):
        fetcher.fetch("s3://models/m")
    assert _cache_bytes(tmp_path / "cache") == 0


def test_max_model_bytes_defaults_to_the_capacity():
    assert Settings(capacity_bytes=123 * MiB).fetcher().max_model_bytes == 123 * MiB
    assert Settings(capacity_bytes=123 * MiB, max_model_bytes=MiB).fetcher().max_model_bytes == MiB


def _endless() -> Iterator[bytes]:
    info = tarfile.TarInfo("huge.bin")
    info.size = 2**40
    yield info.tobuf(tarfile.GNU_FORMAT)
    chunk = bytes(64 * 1024)
    while True:
        time.sleep(0.001)
        yield chunk


def test_cancel_stops_an_extraction_between_chunks(tmp_path):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    target = tmp_path / "t"
    target.mkdir()
    error, took = _run_bounded(lambda: extract_chunks(_endless(), target, budget=LoadBudget(None, cancel)))
    assert isinstance(error, LoadCancelled) and took < 2


def test_gunzip_inflates_a_bomb_chunk_in_bounded_pieces():
    bomb = gzip.compress(bytes(256 * MiB), 9)  # ~250 KiB in, one chunk
    sizes = [len(out) for out in gunzip(iter([bomb]), out_chunk=MiB)]
    assert max(sizes) <= MiB and sum(sizes) == 256 * MiB


def test_zip_errors_are_refusals(tmp_path):
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", bytes(10_000))
    raw = bytearray(good.getvalue())
    raw[40:60] = bytes(20)  # corrupt the deflate stream, keep the directory
    path = tmp_path / "bad.zip"
    path.write_bytes(bytes(raw))
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(UnsafeArchive):
        extract_zip(path, target)
