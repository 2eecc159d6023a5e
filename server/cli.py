"""The ``meshserve`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description="An Open Inference Protocol v2 model server.")
    parser.add_argument("--version", action="version", version=f"meshserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models over REST and gRPC")
    s.add_argument("--model-dir", type=Path, help="serve every model found in this directory")
    s.add_argument("--config", type=Path, help="a YAML or JSON settings file (may list models)")
    s.add_argument("--host", help="address to bind (default 0.0.0.0)")
    s.add_argument("--http-port", type=int, help="REST port (default 8080)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 8081)")
    s.add_argument("--max-request-bytes", type=int, help="largest request body accepted")
    s.add_argument("--capacity-bytes", type=int, help="bytes of models this pod may hold (default: 70%% of memory)")
    s.add_argument("--min-churn-age", type=float, help="seconds a used model is safe from eviction")
    s.add_argument("--no-preload", action="store_const", const=False, dest="preload", help="load models on first use")
    s.add_argument("--log-level", help="debug, info, warning, error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from pydantic import ValidationError

        from server.process import serve
        from server.settings import Settings

        try:
            settings = Settings.load(
                args.config,
                model_dir=args.model_dir,
                host=args.host,
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                max_request_bytes=args.max_request_bytes,
                log_level=args.log_level,
                capacity_bytes=args.capacity_bytes,
                min_churn_age_seconds=args.min_churn_age,
                preload=args.preload,
            )
        except (ValidationError, OSError, ValueError) as e:
            print(f"meshserve: invalid settings: {e}", file=sys.stderr)
            return 2
        serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
