"""Bounded fuzzing of the extractors (tar, tar.gz, zip, OCI layers) on generated and
mutated archives. For every example: the only exceptions are the loader's own
(ModelLoadError and its refusals), nothing is written outside the target, no link
in the target leads out of it, and each example finishes within its deadline."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshserve.loaders.archive import extract_zip
from meshserve.loaders.limits import LoadBudget
from meshserve.loaders.oci import VerifyingReader
from meshserve.loaders.tarstream import extract_chunks, gunzip
from meshserve.protocol.errors import ModelLoadError

LIMIT = 2 * 1024 * 1024
EXAMPLES = 500  # per target: ~15 s for the whole file on a shared 2-core machine
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per example (typical: under 20): a spin fails here, a busy shared machine does not
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

parts = st.sampled_from(["a", "b", "models", "..", ".", "", "c d", "é", "x" * 120])
names = st.lists(parts, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/etc/passwd", "C:/x", "../up"])
kinds = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
member = st.tuples(names, kinds, names, st.binary(max_size=600))
mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8)


def _tar(members: list[tuple[str, bytes, str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, link, data in members:
            info = tarfile.TarInfo(name or "empty")
            info.type, info.linkname = kind, link
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _mutate(raw: bytes, changes: list[tuple[float, int]]) -> bytes:
    out = bytearray(raw)
    for where, byte in changes:
        if out:
            out[int(where * len(out))] = byte
    return bytes(out)


def _chunked(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]


def _check(extract: Callable[[Path], object]) -> None:
    """Run one extraction in a fresh box: ``target`` inside, a sentinel beside it."""
    with tempfile.TemporaryDirectory() as box:
        root = Path(box)
        target = root / "target"
        target.mkdir()
        (root / "sentinel").write_bytes(b"keep")
        try:
            extract(target)
        except ModelLoadError:
            pass  # a refusal: what the loader is for
        assert sorted(p.name for p in root.iterdir()) == ["sentinel", "target"]
        assert (root / "sentinel").read_bytes() == b"keep"
        real_root = os.path.realpath(target)
        for folder, dirs, files in os.walk(target):
            for entry in (*dirs, *files):
                real = os.path.realpath(os.path.join(folder, entry))
                assert real == real_root or real.startswith(real_root + os.sep), (entry, real)


@FUZZ
@given(
    st.lists(member, max_size=6),
    st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]),
    mutations,
    st.integers(1, 2048),
    st.sampled_from([None, "models"]),
)
def test_fuzz_tar(members, fmt, changes, chunk, prefix):
    try:
        raw = _tar(members, fmt)
    except (ValueError, UnicodeError, tarfile.TarError):
        return  # tarfile would not write it; nothing to extract
    raw = _mutate(raw, changes)
    _check(lambda t: extract_chunks(iter(_chunked(raw, chunk)), t, prefix, LoadBudget(LIMIT)))


@FUZZ
@given(st.binary(max_size=3000), st.integers(1, 700))
def test_fuzz_tar_raw_bytes(raw, chunk):
    """Headers straight from bytes: sizes, PAX records and GNU names as the fuzzer likes them."""
    _check(lambda t: extract_chunks(iter(_chunked(raw, chunk)), t, None, LoadBudget(LIMIT)))


@FUZZ
@given(st.lists(member, max_size=5), mutations, st.integers(1, 4096))
def test_fuzz_tar_gz(members, changes, chunk):
    try:
        raw = gzip.compress(_tar(members, tarfile.PAX_FORMAT))
    except (ValueError, UnicodeError, tarfile.TarError):
        return
    raw = _mutate(raw, changes)
    _check(lambda t: extract_chunks(gunzip(iter(_chunked(raw, chunk))), t, None, LoadBudget(LIMIT)))


@FUZZ
@given(st.lists(st.tuples(names, st.binary(max_size=600), st.booleans()), max_size=5), mutations)
def test_fuzz_zip(files, changes):
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are part of the game
        for name, data, deflate in files:
            info = zipfile.ZipInfo(name or "empty")
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(info, data)
    raw = _mutate(buf.getvalue(), changes)

    def extract(target: Path) -> None:
        archive = target.parent / "in.zip"
        archive.write_bytes(raw)
        try:
            extract_zip(archive, target, LoadBudget(LIMIT))
        finally:
            archive.unlink()

    _check(extract)


@FUZZ
@given(st.lists(member, max_size=5), mutations, st.integers(1, 4096))
def test_fuzz_oci_layer(members, changes, chunk):
    """A modelcar layer as a pull streams it: digest/size check, gunzip, models/ only."""
    try:
        raw = gzip.compress(_tar([(f"models/{n}", k, lk, d) for n, k, lk, d in members], tarfile.PAX_FORMAT))
    except (ValueError, UnicodeError, tarfile.TarError):
        return
    raw = _mutate(raw, changes)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()

    def extract(target: Path) -> None:
        blob = VerifyingReader(iter(_chunked(raw, chunk)), digest, len(raw), "fuzzed layer")
        extract_chunks(gunzip(blob.chunks()), target, "models", LoadBudget(LIMIT))
        blob.finish()

    _check(extract)
