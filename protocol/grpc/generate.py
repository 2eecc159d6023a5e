"""Regenerate the gRPC stubs from grpc_service.proto (run from the repo root).

The stubs are committed so the core installs without grpcio-tools; a test
regenerates them and checks they match. protoc names modules after the proto's
path, so the proto is staged as ``meshserve/protocol/grpc/`` (its import path)
and the stubs are written back to the repository's ``protocol/grpc/``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO = "protocol/grpc/grpc_service.proto"
STUBS = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")


def generate(out_dir: Path, root: Path) -> None:
    """Write the stubs to ``out_dir/protocol/grpc/``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "in"
        built = Path(tmp) / "out"
        (stage / "meshserve" / "protocol" / "grpc").mkdir(parents=True)
        built.mkdir()
        shutil.copy(root / PROTO, stage / "meshserve" / PROTO)
        args = [
            "protoc",
            f"-I{stage}",
            f"--python_out={built}",
            f"--grpc_python_out={built}",
            str(stage / "meshserve" / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        dest = out_dir / "protocol" / "grpc"
        dest.mkdir(parents=True, exist_ok=True)
        for name in STUBS:
            shutil.copy(built / "meshserve" / "protocol" / "grpc" / name, dest / name)


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[2]
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else repo, repo)
