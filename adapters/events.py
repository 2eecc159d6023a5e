"""GitHub push webhooks: verify the signature, match triggers, start workflows."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from meshserve.adapters.specs import TriggerSpec

SIGNATURE_HEADER = "X-Hub-Signature-256"
DELIVERY_HEADER = "X-GitHub-Delivery"  # a GUID per delivery: replay protection keys on it


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """GitHub's X-Hub-Signature-256: HMAC-SHA256 of the raw body, compared in constant time."""
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def push_facts(event: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(repository full name, branch, head commit) of a push event."""
    repo = (event.get("repository") or {}).get("full_name")
    ref = event.get("ref")
    branch = ref.removeprefix("refs/heads/") if isinstance(ref, str) and ref.startswith("refs/heads/") else None
    return repo, branch, event.get("after")


def matches(trigger: TriggerSpec, repo: str | None, branch: str | None) -> bool:
    return repo is not None and repo.lower() == trigger.repository.lower() and branch in trigger.branches
