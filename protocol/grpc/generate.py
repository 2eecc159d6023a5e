"""Regenerate the gRPC stubs from grpc_service.proto (run from the repo root).

The stubs are committed so the core installs without grpcio-tools; a test
regenerates them and checks they match.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "protocol/grpc/grpc_service.proto"


def generate(out_dir: Path, root: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(root / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[2]
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else repo, repo)
