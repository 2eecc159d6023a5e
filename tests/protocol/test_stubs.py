"""The committed gRPC stubs are what the proto generates."""

from pathlib import Path

from meshserve.protocol.grpc.generate import generate

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto(tmp_path):
    generate(tmp_path, REPO)
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py"):
        fresh = (tmp_path / "protocol" / "grpc" / name).read_text()
        assert fresh == (REPO / "protocol" / "grpc" / name).read_text(), (
            f"{name} is stale: run protocol/grpc/generate.py"
        )
