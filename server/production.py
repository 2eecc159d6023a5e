"""The ``meshserve serve`` flags for production settings (docs/operations/production.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("production")
    g.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    g.add_argument(
        "--access-log", choices=["all", "errors", "off"],
        help="a line per request: all, only failed ones (default: errors), or none",
    )  # fmt: skip
    g.add_argument("--no-access-log", action="store_const", const="off", dest="access_log", help="--access-log off")
    g.add_argument("--auth-token", help="require this bearer token / API key (prefer MESHSERVE_AUTH_TOKEN or a file)")
    g.add_argument("--auth-token-file", type=Path, help="accepted tokens, one per line")
    g.add_argument("--auth-health", action="store_const", const=True, help="require the token on health endpoints")
    g.add_argument("--auth-metrics", action="store_const", const=True, help="require the token on /metrics")
    g.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): REST and gRPC serve TLS")
    g.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    g.add_argument("--request-timeout", type=float, help="seconds a request may take (504 / DEADLINE_EXCEEDED)")
    g.add_argument("--body-timeout", type=float, help="seconds a client has to send its body (408; default 30)")
    g.add_argument("--cors-origins", help="comma-separated allowed origins ('*' for any); CORS is off without it")
    g.add_argument("--max-connections", type=int, help="REST: 503 past this many open connections (default 1000)")
    g.add_argument("--max-header-bytes", type=int, help="REST: 431 past this many bytes of headers (default 64 KiB)")
    g.add_argument("--header-timeout", type=float, help="seconds a connection has to send its headers (default 10)")
    g.add_argument("--keepalive-timeout", type=float, help="seconds an idle keep-alive connection stays (default 5)")
    g.add_argument("--shutdown-grace", type=float, help="seconds in-flight requests get after SIGTERM (default 10)")
    g.add_argument("--drain-seconds", type=float, help="after SIGTERM, seconds not ready but still accepting")
    g.add_argument("--workers", type=int, help="serving processes; each model lives in one of them (default 1)")
    g.add_argument(
        "--worker-copy-rate", type=float,
        help="with --workers: requests/s for another worker's small model that give it a copy here (default 5; 0: off)",
    )  # fmt: skip
    g.add_argument(
        "--repository-uris", choices=["any", "model-dir", "none"],
        help="where a repository load may point a model's uri: inside --model-dir (default), any (needs an auth "
        "token), none",
    )  # fmt: skip
    g.add_argument(
        "--repository-code", action="store_const", const=True,
        help="let repository loads name code (import paths, trust_remote_code); needs an auth token",
    )  # fmt: skip
    g.add_argument("--tracing", action="store_const", const=True, help="OpenTelemetry spans (the otel extra)")
    g.add_argument(
        "--trace-probes", action="store_const", const=True,
        help="with --tracing, also trace health probes, /metrics and ASGI internals (dropped by default)",
    )  # fmt: skip


def values(args: argparse.Namespace) -> dict[str, Any]:
    origins = args.cors_origins
    return {
        "log_format": args.log_format,
        "access_log": args.access_log,
        "auth_token": args.auth_token,
        "auth_token_file": args.auth_token_file,
        "auth_health": args.auth_health,
        "auth_metrics": args.auth_metrics,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "request_timeout_seconds": args.request_timeout,
        "body_timeout_seconds": args.body_timeout,
        "cors_origins": [o.strip() for o in origins.split(",") if o.strip()] if origins else None,
        "max_connections": args.max_connections,
        "max_header_bytes": args.max_header_bytes,
        "header_timeout_seconds": args.header_timeout,
        "keepalive_timeout_seconds": args.keepalive_timeout,
        "shutdown_grace_seconds": args.shutdown_grace,
        "drain_seconds": args.drain_seconds,
        "workers": args.workers,
        "worker_copy_rate": args.worker_copy_rate,
        "tracing": args.tracing,
        "trace_probes": args.trace_probes,
        "repository_uris": args.repository_uris,
        "repository_code": args.repository_code,
    }
