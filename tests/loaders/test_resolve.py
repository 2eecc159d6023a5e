import pytest
from meshserve.loaders import UnsupportedURI, resolve_uri
from meshserve.protocol.errors import ModelLoadError


def test_paths_and_file_uris(tmp_path):
    (tmp_path / "m").mkdir()
    assert resolve_uri(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    assert resolve_uri(f"file://{tmp_path}/m") == (tmp_path / "m").resolve()
    assert resolve_uri("m", base_dir=tmp_path) == (tmp_path / "m").resolve()


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_uri(str(tmp_path / "absent"))


@pytest.mark.parametrize("uri", ["ftp://host/x", "gopher://x", "file://otherhost/x"])
def test_unsupported(uri):
    with pytest.raises(UnsupportedURI):
        resolve_uri(uri)
