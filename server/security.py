"""Security basics shared by both fronts: bearer-token / API-key auth, request timeouts,
model-name checks, TLS material.

Tokens come from ``--auth-token`` (or MESHSERVE_AUTH_TOKEN) and/or a file with one token
per line (``--auth-token-file``, re-read at start; several lines allow rotation). A
request carries one as ``Authorization: Bearer <token>`` or ``x-api-key: <token>`` (REST
header or gRPC metadata); each is compared in constant time. Health and metrics stay
open unless ``auth_health`` / ``auth_metrics`` say otherwise (Kubernetes probes and
Prometheus scrapes rarely carry tokens).
"""

from __future__ import annotations

import asyncio
import hmac
import re
from pathlib import Path
from typing import TYPE_CHECKING

from meshserve.protocol.errors import InvalidInput

if TYPE_CHECKING:
    import grpc
    from meshserve.server.settings import Settings

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
METRICS_PATH = "/metrics"
# The dashboard's page and files hold no data (its feed, /v2/dashboard/state, is protected):
# open, since a browser cannot send a token with a navigation (server/rest/dashboard.py).
DASHBOARD_FILES = frozenset({"/dashboard", "/dashboard/", "/dashboard/dashboard.js", "/dashboard/dashboard.css"})
GRPC_HEALTH_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")
WWW_AUTHENTICATE = b'Bearer realm="meshserve"'


# scheme://user:password@host -> scheme://***@host
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@]+@")
_SECRETS: set[str] = set()


def register_secrets(*values: str | None) -> None:
    """Values never to show in an error or a log line (tokens, registry passwords)."""
    _SECRETS.update(v for v in values if v and len(v) >= 4)


def redact(text: str) -> str:
    """An error message or log line without credentials: those in URLs, and known secrets."""
    if "@" in text:
        text = _URL_CREDENTIALS.sub(r"\1***@", text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class Deadlines:
    """Cheap timeouts for many short awaits (reading request bodies): a dict entry per
    await, and one task that wakes every ``period`` seconds to cancel the overdue.
    ``asyncio.timeout`` costs ~9 us per use under uvloop (a timer each); this, well under 1 us.

        task = deadlines.arm(seconds)
        try:
            ...await...
        except asyncio.CancelledError:
            if deadlines.fired(task): raise SomeTimeout(...)
            raise
        finally:
            deadlines.disarm(task)
    """

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self._due: dict[asyncio.Task, float] = {}
        self._fired: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None

    def arm(self, seconds: float) -> asyncio.Task:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._due[task] = loop.time() + seconds
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return task

    def disarm(self, task: asyncio.Task) -> None:
        self._due.pop(task, None)

    def fired(self, task: asyncio.Task) -> bool:
        if task in self._fired:
            self._fired.discard(task)
            task.uncancel()
            return True
        return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            await asyncio.sleep(self.period)
            now = loop.time()
            for task, due in list(self._due.items()):
                if due <= now:
                    del self._due[task]
                    self._fired.add(task)
                    task.cancel()


WEBHOOK_PREFIX = "/v1/adapters/events/"


class Auth:
    """The accepted tokens; ``None`` from :func:`build_auth` when auth is off."""

    def __init__(self, tokens: list[bytes], health: bool, metrics: bool) -> None:
        self.tokens = tokens
        self.health = health
        self.metrics = metrics

    def protects(self, path: str) -> bool:
        if path in HEALTH_PATHS:
            return self.health
        if path == METRICS_PATH:
            return self.metrics
        if path in DASHBOARD_FILES:
            return False
        # Webhooks (GitHub cannot send a bearer token) carry their own HMAC signature,
        # which the route checks: no signature, no trigger.
        return not path.startswith(WEBHOOK_PREFIX)

    def check(self, authorization: bytes | None, api_key: bytes | None) -> bool:
        """Whether a request's credentials match a token (constant time per token)."""
        given = api_key
        if authorization is not None:
            scheme, _, rest = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = rest.strip()
        if not given:
            return False
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(given, token)
        return ok


def build_auth(settings: Settings) -> Auth | None:
    tokens: list[bytes] = []
    register_secrets(settings.registry_password)
    if settings.auth_token is not None and settings.auth_token.get_secret_value():
        tokens.append(settings.auth_token.get_secret_value().encode())
    if settings.auth_token_file is not None:
        for line in Path(settings.auth_token_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                tokens.append(line.strip().encode())
    register_secrets(*(t.decode(errors="replace") for t in tokens))
    if not tokens:
        return None
    return Auth(tokens, settings.auth_health, settings.auth_metrics)


def check_model_name(name: str, what: str = "model name") -> None:
    """Names become cache keys and, for the repository API, may meet paths: no separators,
    no dot-dot, no control characters."""
    if (
        not name
        or len(name) > 256
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith(".")
        or not name.isprintable()
    ):
        raise InvalidInput(f"invalid {what} {name[:64]!r}: use letters, digits, '-', '_' and '.' (not leading)")


def check_startup(settings: Settings) -> None:
    """Settings that let clients run code or commands need an authenticated operator:
    refuse to start with them and no token (docs/operations/security.md)."""
    if build_auth(settings) is not None:
        return
    needs = []
    if settings.repository_uris == "any":
        needs.append("--repository-uris any (loads fetch and run models from any uri)")
    if settings.repository_code:
        needs.append("--repository-code (repository loads may name code)")
    if settings.adapters:
        needs.append("--adapters (its routes start training, tuning and workflow commands)")
    elif settings.adapters_url:
        needs.append("--adapters-url (the adapters it proxies to start training, tuning and workflow commands)")
    if needs:
        raise ValueError(
            f"{'; '.join(needs)}: needs an auth token (--auth-token-file, or MESHSERVE_AUTH_TOKEN) so that "
            "only an authenticated operator can use it"
        )


def grpc_auth_interceptor(auth: Auth) -> grpc.aio.ServerInterceptor:
    import grpc

    async def _deny_async(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")

    async def _deny_stream(request_iterator: object, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid credentials")
        yield  # pragma: no cover - a generator for the streaming signature

    unary = grpc.unary_unary_rpc_method_handler(_deny_async)
    stream = grpc.stream_stream_rpc_method_handler(_deny_stream)

    class AuthInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            if not auth.health and details.method in GRPC_HEALTH_METHODS:
                return await continuation(details)
            authorization = api_key = None
            for key, value in details.invocation_metadata or ():
                if key == "authorization":
                    authorization = value.encode() if isinstance(value, str) else value
                elif key == "x-api-key":
                    api_key = value.encode() if isinstance(value, str) else value
            if auth.check(authorization, api_key):
                return await continuation(details)
            return stream if details.method.endswith("StreamInfer") else unary

    return AuthInterceptor()


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    import grpc

    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
