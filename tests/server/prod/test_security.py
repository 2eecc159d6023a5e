"""Security basics against a real server: tokens, timeouts, body limits, slow clients,
CORS, path traversal, connection floods, TLS."""

from __future__ import annotations

import datetime
import gzip
import socket
import ssl
import time
from pathlib import Path

import grpc
import httpx
import orjson
import pytest

from tests.server.prod.conftest import grpc_infer_request, grpc_stub, infer_doc, read_all, spawn_server
from tests.support.server import RunningServer, start_server

TOKEN = "s3cret-token-do-not-echo"
ROTATED = "second-token"
LIMIT = 4096


@pytest.fixture(scope="module")
def srv(prod_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    (d / "tokens").write_text(f"# rotated tokens\n{ROTATED}\n")
    s = start_server(
        prod_models, d / "server.log", "--auth-token-file", str(d / "tokens"), "--request-timeout", "1",
        "--body-timeout", "1", "--max-request-bytes", str(LIMIT), "--cors-origins", "https://ui.example",
        "--repository-uris", "any",
        env={"MESHSERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    yield s
    s.stop()
    assert TOKEN not in s.log() and ROTATED not in s.log()


AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.http_url, timeout=10) as c:
        yield c


def test_tokens_on_every_data_plane_route(http):
    for method, path in [
        ("POST", "/v2/models/slow/infer"), ("GET", "/v2/models/slow"), ("GET", "/v2/models/slow/ready"),
        ("GET", "/v2"), ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/slow/load"),
        ("POST", "/v2/repository/models/slow/unload"), ("GET", "/openapi.json"),
    ]:  # fmt: skip
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": TOKEN[:-1]}, {"authorization": TOKEN}):
            r = http.request(method, path, headers=headers, json=infer_doc([1]) if "infer" in path else None)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json() == {"error": "missing or invalid credentials"} and TOKEN not in r.text
    assert http.post("/v2/models/slow/infer", json=infer_doc([1]), headers=AUTH).status_code == 200
    assert http.post("/v2/models/slow/infer", json=infer_doc([1]), headers={"x-api-key": TOKEN}).status_code == 200
    rotated = {"authorization": f"bearer {ROTATED}"}
    assert http.get("/v2/models/slow", headers=rotated).status_code == 200
    # Health and metrics stay open (probes and scrapes carry no token) unless configured.
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/metrics").status_code == 200


def test_grpc_tokens(srv):
    with grpc.insecure_channel(srv.grpc_address) as channel:
        stub = grpc_stub(channel)
        from meshserve.protocol.grpc import grpc_service_pb2 as pb

        for metadata in ((), (("authorization", "Bearer nope"),), (("x-api-key", ROTATED + "x"),)):
            for call, req in [
                (stub.ModelInfer, grpc_infer_request("slow", [1])),
                (stub.ModelMetadata, pb.ModelMetadataRequest(name="slow")),
                (stub.ModelReady, pb.ModelReadyRequest(name="slow")),
                (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="slow")),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    call(req, metadata=metadata, timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TOKEN not in (e.value.details() or "")
            stream = stub.ModelStreamInfer(iter([grpc_infer_request("slow", [1])]), metadata=metadata, timeout=5)
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = stub.ModelInfer(grpc_infer_request("slow", [3]), metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert list(out.outputs[0].contents.fp32_contents) == [6.0]
        assert stub.ModelInfer(grpc_infer_request("slow", [1]), metadata=(("x-api-key", ROTATED),)).outputs
        assert stub.ServerReady(pb.ServerReadyRequest()).ready  # health: open by default


def test_health_and_metrics_can_require_the_token(prod_models, tmp_path):
    s = spawn_server(
        prod_models, tmp_path / "log", "--auth-health", "--auth-metrics", env={"MESHSERVE_AUTH_TOKEN": TOKEN},
        probe=lambda s: httpx.get(s.http_url + "/v2/health/ready", headers=AUTH).status_code == 200,
    )  # fmt: skip
    try:
        for path in ("/v2/health/ready", "/v2/health/live", "/metrics"):
            assert httpx.get(s.http_url + path).status_code == 401
            assert httpx.get(s.http_url + path, headers=AUTH).status_code in (200, 503)
        from meshserve.protocol.grpc import grpc_service_pb2 as pb

        with grpc.insecure_channel(s.grpc_address) as channel, pytest.raises(grpc.RpcError) as e:
            grpc_stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()


def test_errors_and_logs_never_carry_credentials(srv, http):
    leaky = "https://user:hunter2-pw@127.0.0.1:1/model.tar.gz"
    doc = {"parameters": {"config": {"name": "leaky", "uri": leaky}}}
    r = http.post("/v2/repository/models/leaky/load", json=doc, headers=AUTH)
    assert r.status_code >= 400 and "hunter2-pw" not in r.text and "***@127.0.0.1" in r.json()["error"], r.text
    index = http.post("/v2/repository/index", headers=AUTH).text
    assert "leaky" in index and "hunter2-pw" not in index
    # A token used as a model name is not echoed back either.
    r = http.post(f"/v2/models/{TOKEN}/infer", json=infer_doc([1]), headers=AUTH)
    assert r.status_code == 404 and TOKEN not in r.text
    with grpc.insecure_channel(srv.grpc_address) as channel:
        from meshserve.protocol.grpc import grpc_service_pb2 as pb

        md = (("authorization", f"Bearer {TOKEN}"),)
        rows = grpc_stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md)
        assert "hunter2-pw" not in str(rows)
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(channel).ModelInfer(grpc_infer_request(f"x\n{TOKEN}", [1]), metadata=md)
        assert TOKEN not in e.value.details()
    time.sleep(0.2)  # access lines are written every 50 ms
    assert "hunter2-pw" not in srv.log() and TOKEN not in srv.log()
    assert not any(line.startswith(TOKEN) for line in srv.log().splitlines())


def test_grpc_token_stream_errors_are_redacted(srv, http):
    """An LLM's token stream answers a failed load with the same redaction as every other path."""
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    leaky = "https://user:hunter3-pw@127.0.0.1:1/llm.tar.gz"
    doc = {"parameters": {"config": {"name": "leaky-llm", "uri": leaky, "runtime": "llm"}}}
    assert http.post("/v2/repository/models/leaky-llm/load", json=doc, headers=AUTH).status_code >= 400
    req = pb.ModelInferRequest(model_name="leaky-llm")
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"hello")
    req.parameters["stream"].bool_param = True
    with grpc.insecure_channel(srv.grpc_address) as channel:
        md = (("authorization", f"Bearer {TOKEN}"),)
        answers = list(grpc_stub(channel).ModelStreamInfer(iter([req]), metadata=md, timeout=10))
    assert len(answers) == 1 and answers[0].error_message, answers
    assert "hunter3-pw" not in answers[0].error_message and "***@127.0.0.1" in answers[0].error_message


def test_request_timeout_and_grpc_deadline(srv, http):
    t = time.monotonic()
    r = http.post("/v2/models/slow/infer", json=infer_doc([1], sleep=3), headers=AUTH)
    assert r.status_code == 504 and "within 1s" in r.json()["error"]
    assert time.monotonic() - t < 2.5
    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(srv.grpc_address) as channel:
        stub = grpc_stub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(grpc_infer_request("slow", [1], sleep=3), metadata=md)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:  # the client's tighter deadline wins
            stub.ModelInfer(grpc_infer_request("slow", [1], sleep=3), metadata=md, timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t < 1
        assert stub.ModelInfer(grpc_infer_request("slow", [2]), metadata=md).outputs  # still serving
    assert http.post("/v2/models/slow/infer", json=infer_doc([1]), headers=AUTH).status_code == 200


def _raw(srv: RunningServer, data: bytes, then: list[bytes] | None = None, gap: float = 0.0) -> tuple[bytes, float]:
    """Send raw bytes (then trickle more); the response and how long it took."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:
        s.sendall(data)
        for chunk in then or []:
            time.sleep(gap)
            try:
                s.sendall(chunk)
            except OSError:
                break
        out = read_all(s)
    return out, time.monotonic() - t


def _head(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
            f"content-type: application/json\r\n{extra}\r\n").encode()  # fmt: skip


def test_slow_clients_are_cut_off_others_served(srv, http):
    # Declares 200 bytes, sends 10 and stalls.
    out, took = _raw(srv, _head("/v2/models/slow/infer", "content-length: 200\r\n") + b'{"inputs":')
    assert out.startswith(b"HTTP/1.1 408") and b"not received within 1s" in out and took < 5
    # Trickles a chunked body, a byte every 0.3 s: cut off after the timeout, not served forever.
    chunks = [b"1\r\n{\r\n"] * 20
    out, took = _raw(srv, _head("/v2/models/slow/infer", "transfer-encoding: chunked\r\n"), chunks, gap=0.3)
    assert out.startswith(b"HTTP/1.1 408") and took < 5
    # The same on the FastAPI side (repository load).
    out, _ = _raw(srv, _head("/v2/repository/models/slow/load", "content-length: 50\r\n") + b"{")
    assert out.startswith(b"HTTP/1.1 408")
    assert http.post("/v2/models/slow/infer", json=infer_doc([1]), headers=AUTH).status_code == 200


def test_body_limits_cover_chunked_and_gzip_bombs(srv, http):
    big = orjson.dumps(infer_doc([1.0] * 2000))
    assert len(big) > LIMIT
    assert http.post("/v2/models/slow/infer", content=big, headers=AUTH).status_code == 413
    r = http.post("/v2/models/slow/infer", content=iter([big[:1000], big[1000:]]), headers=AUTH)  # chunked
    assert r.status_code == 413 and "limit" in r.json()["error"]
    bomb = gzip.compress(b" " * 3_500_000, 9)  # ~1000:1, the most gzip does
    assert len(bomb) < LIMIT
    r = http.post("/v2/models/slow/infer", content=bomb, headers={**AUTH, "content-encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"]
    r = http.post("/v2/repository/models/slow/load", content=iter([b"{", b" " * LIMIT, b"}"]), headers=AUTH)
    assert r.status_code == 413
    with grpc.insecure_channel(srv.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(channel).ModelInfer(
                grpc_infer_request("slow", [1.0] * 2000), metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cors_only_for_configured_origins(srv, http, prod_models, tmp_path):
    pre = {"origin": "https://ui.example", "access-control-request-method": "POST"}
    r = http.options("/v2/models/slow/infer", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    r = http.options("/v2/models/slow/infer", headers={**pre, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = http.post("/v2/models/slow/infer", json=infer_doc([1]), headers={**AUTH, "origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    # Off by default.
    plain = start_server(prod_models, tmp_path / "plain.log")
    try:
        r = httpx.post(f"{plain.http_url}/v2/models/slow/infer", json=infer_doc([1]), headers=pre)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in httpx.options(f"{plain.http_url}/v2", headers=pre).headers
    finally:
        plain.stop()


TRAVERSALS = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "..%5C..%5Cetc", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "slow%00"]


def test_model_names_cannot_escape(srv):
    # Raw paths: httpx would normalise the dots away.
    for name in TRAVERSALS:
        for method, path in [
            ("POST", f"/v2/models/{name}/infer"), ("GET", f"/v2/models/{name}"),
            ("GET", f"/v2/models/slow/versions/{name}"), ("POST", f"/v2/models/slow/versions/{name}/infer"),
            ("POST", f"/v2/repository/models/{name}/load"), ("POST", f"/v2/repository/models/{name}/unload"),
        ]:  # fmt: skip
            body = b"{}"
            req = (f"{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
                   f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body  # fmt: skip
            out, _ = _raw(srv, req)
            head, _, payload = out.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            assert status in (400, 404, 405), (path, out[:200])
            assert b"root:" not in payload and b"Traceback" not in payload
            assert orjson.loads(payload)["error"]
    from meshserve.protocol.grpc import grpc_service_pb2 as pb

    md = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(srv.grpc_address) as channel:
        stub = grpc_stub(channel)
        for name in ["../../etc/passwd", "..", "a/../../b", "..\\x", ".hidden", "x\x00y"]:
            with pytest.raises(grpc.RpcError) as e:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), metadata=md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), metadata=md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(grpc_infer_request(name, [1]), metadata=md)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="slow", version=name), metadata=md)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # A config naming another model, or a path-like name, is refused before anything is read.
        req = pb.RepositoryModelLoadRequest(model_name="slow")
        req.parameters["config"].string_param = '{"name": "../../etc", "uri": "/etc"}'
        with pytest.raises(grpc.RpcError) as e:
            stub.RepositoryModelLoad(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.ModelInfer(grpc_infer_request("slow", [1]), metadata=md).outputs


def test_connection_flood_does_not_starve_others(srv, http):
    idle = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", srv.http_port), timeout=5)
            if i % 3 == 0:
                s.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: x\r\n")  # headers never finished
            idle.append(s)
        grpc_idle = [socket.create_connection(("127.0.0.1", srv.grpc_port), timeout=5) for _ in range(100)]
        idle += grpc_idle
        t = time.monotonic()
        for _ in range(20):
            assert http.post("/v2/models/slow/infer", json=infer_doc([1]), headers=AUTH).status_code == 200
        with httpx.Client(base_url=srv.http_url, timeout=5) as fresh:  # a new connection gets in too
            assert fresh.get("/v2/health/ready").status_code == 200
        with grpc.insecure_channel(srv.grpc_address) as channel:
            md = (("authorization", f"Bearer {TOKEN}"),)
            assert grpc_stub(channel).ModelInfer(grpc_infer_request("slow", [1]), metadata=md, timeout=5).outputs
        assert time.monotonic() - t < 5
    finally:
        for s in idle:
            s.close()


def _self_signed(d: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = d / "tls.crt", d / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_on_rest_and_grpc(prod_models, tmp_path):
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(cafile=str(cert))
    srv = spawn_server(
        prod_models, tmp_path / "tls.log", "--tls-cert", str(cert), "--tls-key", str(key),
        probe=lambda s: httpx.get(f"https://127.0.0.1:{s.http_port}/v2/health/ready", verify=ctx).status_code == 200,
    )  # fmt: skip
    http_port, grpc_port = srv.http_port, srv.grpc_port
    url = f"https://127.0.0.1:{http_port}"
    try:
        r = httpx.post(f"{url}/v2/models/slow/infer", json=infer_doc([2]), verify=ctx)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]
        with pytest.raises(httpx.ConnectError):  # an unknown CA is refused
            httpx.get(f"{url}/v2/health/ready", verify=True)
        with pytest.raises(httpx.RemoteProtocolError):  # plain http on the TLS port
            httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready")
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{grpc_port}", creds) as channel:
            out = grpc_stub(channel).ModelInfer(grpc_infer_request("slow", [5]), timeout=10)
            assert list(out.outputs[0].contents.fp32_contents) == [10.0]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, pytest.raises(grpc.RpcError) as e:
            grpc_stub(channel).ModelInfer(grpc_infer_request("slow", [5]), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_repository_loads_confined_to_the_model_dir_by_default(prod_models, tmp_path):
    s = start_server(prod_models, tmp_path / "log")
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        with httpx.Client(base_url=s.http_url, timeout=30) as http:
            for uri in ["/etc", str(outside), "../../etc", f"file://{outside}", "oci://registry.example/m:1",
                        "https://example.com/m.tar", "slow/../../outside"]:  # fmt: skip
                doc = {"parameters": {"config": {"name": "copy", "uri": uri, "implementation": "model.py:Slow"}}}
                r = http.post("/v2/repository/models/copy/load", json=doc)
                assert r.status_code == 403 and "model directory" in r.json()["error"], (uri, r.text)
                assert str(outside) not in r.text
            ok = {"parameters": {"config": {"name": "copy", "uri": "slow", "implementation": "model.py:Slow"}}}
            assert http.post("/v2/repository/models/copy/load", json=ok).status_code == 200
            assert http.post("/v2/models/copy/infer", json=infer_doc([2])).json()["outputs"][0]["data"] == [4.0]
        from meshserve.protocol.grpc import grpc_service_pb2 as pb

        with grpc.insecure_channel(s.grpc_address) as channel:
            req = pb.RepositoryModelLoadRequest(model_name="copy2")
            req.parameters["config"].string_param = '{"name": "copy2", "uri": "/etc"}'
            with pytest.raises(grpc.RpcError) as e:
                grpc_stub(channel).RepositoryModelLoad(req)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        s.stop()
