"""The ``meshserve`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from meshserve.server.version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description="An Open Inference Protocol v2 model server.")
    parser.add_argument("--version", action="version", version=f"meshserve {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failed command")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models over REST and gRPC")
    _debug_flag(s)
    s.add_argument("--model-dir", type=Path, help="serve every model found in this directory")
    s.add_argument("--config", type=Path, help="a YAML or JSON settings file (may list models)")
    s.add_argument("--host", help="address to bind (default 0.0.0.0)")
    s.add_argument("--http-port", type=int, help="REST port (default 8080)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 8081)")
    s.add_argument("--max-request-bytes", type=int, help="largest request body accepted")
    s.add_argument("--max-bytes-elements", type=int, help="BYTES elements one infer request may hold (default 2**20)")
    s.add_argument("--adapters", action="store_const", const=True, help="training/tuning/workflow/event routes")
    s.add_argument("--adapters-url", help="proxy /v1/adapters/* to this adapters sidecar (meshserve adapters)")
    s.add_argument("--capacity-bytes", type=int, help="bytes of models this pod may hold (default: 70%% of memory)")
    s.add_argument("--min-churn-age", type=float, help="seconds a used model is safe from eviction")
    s.add_argument("--capacity-wait", type=float, help="seconds a cold request waits for room before 503 (default 5)")
    s.add_argument("--no-preload", action="store_const", const=False, dest="preload", help="load models on first use")
    s.add_argument("--log-level", help="debug, info, warning, error")
    s.add_argument("--store", help="etcd://host:port/prefix: join the pods sharing it into one mesh")
    s.add_argument("--max-model-bytes", type=int, help="bytes one remote model may download or unpack")
    s.add_argument("--load-threads", type=int, help="threads for model loads and fetches (default 4)")
    s.add_argument("--insecure", action="store_const", const=True, help="reach OCI registries over plain http")
    s.add_argument("--s3-endpoint", help="S3-compatible endpoint for s3:// models (MinIO...; else AWS_ENDPOINT_URL)")
    from meshserve.server.production import add_flags

    add_flags(s)
    p = sub.add_parser("pull", help="fetch a model URI into the cache (an init-container step)")
    p.add_argument("uri", help="oci://registry/repo:tag, https://..., s3://bucket/prefix")
    _remote_flags(p)
    _debug_flag(p)
    from meshserve.adapters.cli import add_parsers

    add_parsers(sub)  # train, tune, workflow, adapters (the sidecar)
    b = sub.add_parser("modelcar", help="build and push KServe modelcar images")
    bsub = b.add_subparsers(dest="modelcar_command", required=True)
    build = bsub.add_parser("build", help="build a modelcar image from a model directory and push it")
    build.add_argument("model_dir", type=Path)
    build.add_argument("--tag", required=True, help="oci://registry/repository:tag")
    build.add_argument("--kserve-compat", action="store_true", help="add a busybox layer for KServe's sidecar")
    build.add_argument("--busybox", type=Path, default=Path("/bin/busybox"), help="static busybox binary")
    build.add_argument("--uncompressed", action="store_true", help="plain tar layer: faster pulls, bigger pushes")
    _remote_flags(build)
    _debug_flag(build)
    g = sub.add_parser("generate", help="run a JSONL file of prompts through an LLM (resumable)")
    g.add_argument("--model", required=True, help="model URI: a folder, oci://..., https://..., s3://...")
    g.add_argument("--input", required=True, type=Path, help='JSONL: {"id": ..., "prompt" | "messages": ...}')
    g.add_argument("--output", required=True, type=Path, help="JSONL results; ids already there are skipped")
    g.add_argument("--name", help="model name (default: its settings' name or folder name)")
    g.add_argument("--max-tokens", type=int, help="default max_tokens for lines that set none")
    g.add_argument("--temperature", type=float, help="default temperature for lines that set none")
    g.add_argument("--max-in-flight", type=int, default=256, help="prompts submitted at once (default 256)")
    _remote_flags(g)
    _debug_flag(g)
    return parser


def _debug_flag(p: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (SUPPRESS: the top-level flag is not reset)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback on failure")


def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="content cache (default ~/.cache/meshserve)")
    p.add_argument("--insecure", action="store_true", help="reach the registry over plain http")
    p.add_argument("--registry-username")
    p.add_argument("--registry-password", help="else from a docker config.json")
    p.add_argument("--max-model-bytes", type=int, help="bytes the model may download or unpack")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint for s3:// URIs (MinIO...; else AWS_ENDPOINT_URL)")


def _fetcher(args: argparse.Namespace, uri: str):
    """The fetcher for one command; --registry-username is for the registry ``uri`` names only."""
    from meshserve.loaders.oci import Reference
    from meshserve.server.settings import Settings

    host = Reference.parse(uri).registry if args.registry_username and uri.startswith("oci://") else None
    return Settings.load(
        None,
        cache_dir=args.cache_dir,
        insecure_registries=True if args.insecure else None,
        registry_username=args.registry_username if host else None,
        registry_password=args.registry_password if host else None,
        registry_credentials_host=host,
        max_model_bytes=args.max_model_bytes,
        s3_endpoint=args.s3_endpoint,
    ).fetcher()


def _pull(args: argparse.Namespace) -> int:
    from meshserve.loaders.progress import Progress

    fetcher = _fetcher(args, args.uri)
    fetcher.offline_first = False  # an explicit pull asks the source
    progress = Progress(f"pull {args.uri}", enabled=not args.quiet)
    path = fetcher.fetch(args.uri, progress=progress)
    progress.close()
    print(path)
    return 0


def _modelcar_build(args: argparse.Namespace) -> int:
    from meshserve.loaders.modelcar import build_and_push
    from meshserve.loaders.oci import Reference
    from meshserve.loaders.progress import Progress
    from meshserve.loaders.resolve import check_oci_tag

    check_oci_tag(args.tag)
    fetcher = _fetcher(args, args.tag)
    ref = Reference.parse(args.tag)
    progress = Progress(f"push {args.tag}", enabled=not args.quiet)
    with fetcher.client_for(ref.registry) as client:
        digest = build_and_push(
            args.model_dir, args.tag, client, args.kserve_compat, args.busybox, progress, compress=not args.uncompressed
        )
    progress.close()
    print(f"{ref}@{digest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("train", "tune", "workflow", "adapters"):
        from meshserve.adapters.cli import run_command

        return run_command(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"meshserve {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    """An error as one line: our errors say what to do; others get their type and --debug."""
    from meshserve.protocol.errors import InferenceError

    if isinstance(e, InferenceError):
        return e.message.splitlines()[0] if e.message else type(e).__name__
    text = str(e).strip().splitlines()
    detail = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return f"{detail} (run with --debug for the traceback)"


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "modelcar":
        return _modelcar_build(args)
    if args.command == "generate":
        from meshserve.server.llm.offline import main as generate_main

        return generate_main(args, _fetcher(args, args.model))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from meshserve.server.process import serve
    from meshserve.server.security import check_startup
    from meshserve.server.settings import Settings
    from pydantic import ValidationError

    try:
        settings = Settings.load(args.config, **serve_overrides(args))
    except (ValidationError, OSError, ValueError) as e:
        print(f"meshserve: invalid settings: {_settings_error(e)}", file=sys.stderr)
        return 2
    try:
        check_startup(settings)
    except ValueError as e:
        print(f"meshserve: refusing to start: {e}", file=sys.stderr)
        return 2
    if settings.model_dir is not None and not Path(settings.model_dir).is_dir():
        print(f"meshserve: invalid settings: model directory {settings.model_dir} does not exist", file=sys.stderr)
        return 2
    serve(settings)
    return 0


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields from ``serve``'s flags (None: not given). docs/generate.py reads the
    flag of each setting from here, so the settings table cannot drift from the parser."""
    from meshserve.server import production

    return dict(
        model_dir=args.model_dir,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_request_bytes=args.max_request_bytes,
        max_bytes_elements=args.max_bytes_elements,
        adapters=args.adapters,
        adapters_url=args.adapters_url,
        log_level=args.log_level,
        capacity_bytes=args.capacity_bytes,
        min_churn_age_seconds=args.min_churn_age,
        capacity_wait_seconds=args.capacity_wait,
        preload=args.preload,
        **production.values(args),
        store=args.store,
        max_model_bytes=args.max_model_bytes,
        load_threads=args.load_threads,
        insecure_registries=args.insecure,
        s3_endpoint=args.s3_endpoint,
    )


def _settings_error(e: Exception) -> str:
    """pydantic's multi-line report as one line."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
