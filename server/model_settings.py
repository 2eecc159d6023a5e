"""Per-model settings: a small file beside the model (model-settings.json or .yaml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshserve.protocol.datatypes import DTYPES
from meshserve.protocol.errors import InvalidInput
from meshserve.protocol.types import ModelMetadata, TensorMetadata
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SETTINGS_FILES = ("model-settings.json", "model-settings.yaml", "model-settings.yml")


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown datatype {v!r}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 for d in v):
            raise ValueError("dimensions must be >= -1 (-1: any size)")
        return v


class ModelSettings(BaseModel):
    """What a model is and how to run it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    uri: str | None = None
    runtime: str | None = None
    implementation: str | None = None
    platform: str = ""
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    parameters: dict[str, Any] = {}
    max_concurrency: int = Field(default=4, ge=1)
    # Requests waiting for one of those slots (or for a batch): past it, 503 with Retry-After /
    # UNAVAILABLE at once, so a burst cannot pile up memory and latency without end.
    max_queue_size: int = Field(default=1024, ge=0)
    # Dynamic batching (runtimes that accept a batch dimension): rows merged into one
    # call, and how long (ms) the first request of a batch may wait for more.
    max_batch_size: int = Field(default=0, ge=0)
    max_batch_latency: float = Field(default=0.0, ge=0)
    # Never evicted from the cache, and loaded at start.
    pinned: bool = False

    @field_validator("uri")
    @classmethod
    def _uri_form(cls, v: str | None) -> str | None:
        """A scheme no loader takes is the writer's mistake: say so now, not as a failed load."""
        if v is not None:
            from meshserve.loaders.resolve import UnsupportedURI, check_uri_form

            try:
                check_uri_form(v)
            except UnsupportedURI as e:
                raise ValueError(e.message) from None
        return v

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            name=self.name,
            versions=[self.version] if self.version else [],
            platform=self.platform or self.runtime or "",
            inputs=[TensorMetadata(t.name, t.datatype, list(t.shape)) for t in self.inputs],
            outputs=[TensorMetadata(t.name, t.datatype, list(t.shape)) for t in self.outputs],
        )


def parse_model_settings(doc: Any, **defaults: Any) -> ModelSettings:
    """Validate a settings document, turning pydantic's errors into one clear InvalidInput."""
    if not isinstance(doc, dict):
        raise InvalidInput("model settings must be an object")
    try:
        return ModelSettings(**{**defaults, **doc})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise InvalidInput(f"invalid model settings: {problems}") from None


def read_settings_file(model_dir: Path) -> dict[str, Any] | None:
    """The settings document found in ``model_dir``, or None when there is none."""
    for fname in SETTINGS_FILES:
        path = model_dir / fname
        if path.is_file():
            text = path.read_text()
            if fname.endswith(".json"):
                return json.loads(text)
            import yaml

            return yaml.safe_load(text) or {}
    return None
