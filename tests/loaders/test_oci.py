"""OCI modelcars against a real registry: build, push, pull, cache, and every attack."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from meshserve.loaders import ModelFetcher
from meshserve.loaders.archive import UnsafeArchive
from meshserve.loaders.modelcar import build_and_push
from meshserve.loaders.oci import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Reference, RegistryClient, RegistryError

from tests.loaders.conftest import docker_config, model_tree, tree_of


def fetcher(tmp_path: Path, **kw) -> ModelFetcher:
    return ModelFetcher(cache_dir=tmp_path / "cache", insecure=True, **kw)


def push_model(registry, tmp_path: Path, repo: str = "models/demo", tag: str = "v1") -> tuple[str, Path]:
    src = model_tree(tmp_path / f"src-{repo.replace('/', '_')}-{tag}")
    with RegistryClient(registry.host, insecure=True) as client:
        build_and_push(src, f"oci://{registry.host}/{repo}:{tag}", client)
    return f"oci://{registry.host}/{repo}:{tag}", src


def test_build_push_pull_round_trip(registry, tmp_path):
    uri, src = push_model(registry, tmp_path)
    f = fetcher(tmp_path)
    path = f.fetch(uri)
    assert tree_of(path) == tree_of(src)
    assert path.parent.name == "content" and path.name.startswith("sha256-")
    assert f.fetch(uri) == path  # cached


def test_same_folder_gives_same_digest(registry, tmp_path):
    src = model_tree(tmp_path / "src")
    with RegistryClient(registry.host, insecure=True) as client:
        a = build_and_push(src, f"oci://{registry.host}/repro/a:1", client)
        b = build_and_push(src, f"oci://{registry.host}/repro/b:1", client)
    assert a == b


def test_pull_by_digest_and_offline_restart(private_registry, tmp_path):
    src = model_tree(tmp_path / "src")
    with RegistryClient(private_registry.host, insecure=True) as client:
        digest = build_and_push(src, f"oci://{private_registry.host}/m/x:latest", client)
    tag_uri = f"oci://{private_registry.host}/m/x:latest"
    digest_uri = f"oci://{private_registry.host}/m/x@{digest}"
    first = fetcher(tmp_path).fetch(tag_uri)
    private_registry.stop()
    # A restart (a new fetcher on the same cache) with the registry down still finds both.
    again = fetcher(tmp_path)
    assert again.fetch(tag_uri) == first
    assert again.fetch(digest_uri) == first
    again.offline_first = False  # even when asked to check the registry, the cache answers
    assert again.fetch(tag_uri) == first


def test_images_built_are_valid_for_skopeo_and_umoci(registry, tmp_path):
    uri, src = push_model(registry, tmp_path, "valid/modelcar", "1")
    ref = uri.removeprefix("oci://")
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:1"],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True
    )
    assert tree_of(bundle / "rootfs" / "models") == tree_of(src)
    inspect = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"], check=True, capture_output=True
        ).stdout
    )
    assert inspect["Os"] == "linux" and inspect["Architecture"] == "amd64" and len(inspect["Layers"]) == 1


def test_kserve_compat_layer(registry, tmp_path):
    src = model_tree(tmp_path / "src")
    with RegistryClient(registry.host, insecure=True) as client:
        build_and_push(src, f"oci://{registry.host}/compat/m:1", client, kserve_compat=True)
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/compat/m:1", f"oci:{layout}:1"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin" / "sh").is_symlink() and (rootfs / "bin" / "busybox").stat().st_size > 100_000
    out = subprocess.run(
        [str(rootfs / "bin" / "busybox"), "ls", str(rootfs / "models")], capture_output=True, text=True
    )
    assert "model-settings.json" in out.stdout
    assert tree_of(fetcher(tmp_path).fetch(f"oci://{registry.host}/compat/m:1")) == tree_of(src)


def _push_raw_image(client: RegistryClient, repo: str, tag: str, layer: bytes, declared_size: int | None = None) -> str:
    gz = gzip.compress(layer)
    digest = "sha256:" + hashlib.sha256(gz).hexdigest()
    client.push_blob(repo, io.BytesIO(gz), digest, len(gz))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.push_blob(repo, io.BytesIO(config), config_digest, len(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": declared_size or len(gz),
            }
        ],
    }
    return client.push_manifest(repo, tag, json.dumps(manifest).encode())


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "members,message",
    [
        ((_member("models/../../escape"),), "escapes"),
        ((_member("/models/abs"),), "absolute"),
        ((_member("models/link", tarfile.SYMTYPE, "../../../etc/passwd"),), "outside"),
        ((_member("models/link", tarfile.SYMTYPE, "/etc/passwd"),), "absolute"),
        ((_member("models/dev", tarfile.CHRTYPE),), "device"),
    ],
)
def test_malicious_layers_are_refused(registry, tmp_path, members, message):
    repo = "evil/" + hashlib.sha256(message.encode() + members[0].name.encode()).hexdigest()[:8]
    with RegistryClient(registry.host, insecure=True) as client:
        _push_raw_image(client, repo, "1", _tar(_member("models/ok.txt"), *members))
    f = fetcher(tmp_path)
    with pytest.raises(UnsafeArchive, match=message):
        f.fetch(f"oci://{registry.host}/{repo}:1")
    assert list((tmp_path / "cache" / "content").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_tampered_blob_is_refused(private_registry, tmp_path):
    uri, _ = push_model(private_registry, tmp_path, "t/m", "1")
    with RegistryClient(private_registry.host, insecure=True) as client:
        _, manifest = client.image_manifest(Reference.parse(uri))
    hexdigest = manifest["layers"][0]["digest"].split(":")[1]
    blob = private_registry.data / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    raw = bytearray(blob.read_bytes())
    raw[-30] ^= 0xFF  # same length, different bytes
    blob.write_bytes(bytes(raw))
    with pytest.raises(RegistryError, match="does not match its digest|not a valid tar"):
        fetcher(tmp_path).fetch(uri)
    assert list((tmp_path / "cache" / "content").iterdir()) == []


def test_layer_larger_than_declared_is_refused(registry, tmp_path):
    with RegistryClient(registry.host, insecure=True) as client:
        _push_raw_image(client, "big/m", "1", _tar(_member("models/f"), data=b"y" * 5000), declared_size=40)
    with pytest.raises(RegistryError, match="larger than the 40 bytes"):
        fetcher(tmp_path).fetch(f"oci://{registry.host}/big/m:1")
    assert list((tmp_path / "cache" / "content").iterdir()) == []


def test_missing_tag_unreachable_and_not_a_modelcar(registry, tmp_path):
    f = fetcher(tmp_path)
    with pytest.raises(RegistryError, match="not found"):
        f.fetch(f"oci://{registry.host}/nothing/here:v9")
    with pytest.raises(RegistryError, match="unreachable"):
        f.fetch("oci://127.0.0.1:1/x/y:1")
    with RegistryClient(registry.host, insecure=True) as client:
        _push_raw_image(client, "plain/image", "1", _tar(_member("etc/hostname")))
    with pytest.raises(RegistryError, match="not a modelcar"):
        f.fetch(f"oci://{registry.host}/plain/image:1")


def test_401_and_docker_config_credentials(auth_registry, tmp_path, monkeypatch):
    src = model_tree(tmp_path / "src")
    uri = f"oci://{auth_registry.host}/private/m:1"
    with RegistryClient(auth_registry.host, insecure=True, credentials=("alice", "s3cret")) as client:
        build_and_push(src, uri, client)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    with pytest.raises(RegistryError, match="401"):
        fetcher(tmp_path).fetch(uri)
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "bad", auth_registry.host, "alice", "wrong")))
    with pytest.raises(RegistryError, match="401"):
        fetcher(tmp_path).fetch(uri)
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "good", auth_registry.host, "alice", "s3cret")))
    assert tree_of(fetcher(tmp_path).fetch(uri)) == tree_of(src)


def test_index_picks_the_platform(registry, tmp_path):
    with RegistryClient(registry.host, insecure=True) as client:
        amd = _push_raw_image(client, "multi/m", "amd", _tar(_member("models/which"), data=b"amd64"))
        arm = _push_raw_image(client, "multi/m", "arm", _tar(_member("models/which"), data=b"arm64"))
        sizes = {d: len(client.manifest("multi/m", d)[2].__repr__()) for d in (amd, arm)}
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": arm,
                    "size": sizes[arm],
                    "platform": {"os": "linux", "architecture": "arm64"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd,
                    "size": sizes[amd],
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
            ],
        }
        client.push_manifest("multi/m", "both", json.dumps(index).encode(), OCI_INDEX)
    uri = f"oci://{registry.host}/multi/m:both"
    assert (fetcher(tmp_path).fetch(uri) / "which").read_bytes() == b"amd64"
    assert (fetcher(tmp_path / "arm", platform="linux/arm64").fetch(uri) / "which").read_bytes() == b"arm64"
    with pytest.raises(RegistryError, match="no linux/s390x image"):
        fetcher(tmp_path / "s390", platform="linux/s390x").fetch(uri)


def test_oras_pushed_artifacts_pull(registry, tmp_path, monkeypatch):
    import oras.client

    art = tmp_path / "artifact"
    art.mkdir()
    (art / "model.onnx").write_bytes(b"\x08\x01fake-onnx" * 100)
    monkeypatch.chdir(art)
    oras.client.OrasClient(hostname=registry.host, insecure=True).push(
        target=f"{registry.host}/artifacts/m:1", files=["model.onnx"], do_chunked=True, quiet=True
    )
    path = fetcher(tmp_path).fetch(f"oci://{registry.host}/artifacts/m:1")
    assert (path / "model.onnx").read_bytes() == (art / "model.onnx").read_bytes()
    model_tree(art / "folder")  # a directory: oras packs it as a tar.gz marked for unpacking
    oras.client.OrasClient(hostname=registry.host, insecure=True).push(
        target=f"{registry.host}/artifacts/dir:1", files=["folder"], quiet=True
    )
    path = fetcher(tmp_path).fetch(f"oci://{registry.host}/artifacts/dir:1")
    assert tree_of(path / "folder") == tree_of(art / "folder")


def test_concurrent_pulls_download_once(registry, tmp_path, monkeypatch):
    import meshserve.loaders.pull as pull_module

    uri, src = push_model(registry, tmp_path, "race/m", "1")
    calls = []
    real = pull_module._unpack
    monkeypatch.setattr(pull_module, "_unpack", lambda *a: (calls.append(1), real(*a))[1])
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetcher(tmp_path).fetch(uri))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6 and calls == [1]
    assert tree_of(results[0]) == tree_of(src)
