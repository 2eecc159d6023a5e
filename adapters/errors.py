"""Spec errors as the server's InvalidInput (400), naming the bad field."""

from __future__ import annotations

from typing import Any, TypeVar

from meshserve.protocol.errors import InvalidInput
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def describe(e: ValidationError, what: str = "spec") -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"field '{loc}': {err.get('msg', 'invalid')}")
    return f"invalid {what}: " + "; ".join(parts)


def parse(model: type[M], doc: Any, what: str = "spec") -> M:
    if not isinstance(doc, dict):
        raise InvalidInput(f"invalid {what}: expected a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise InvalidInput(describe(e, what)) from None
