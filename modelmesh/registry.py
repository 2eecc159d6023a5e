"""Registered models by name and version: what the mesh may load, apart from what it has loaded.

The in-process store is the embedded default; a fleet keeps the same records in a
coordination store (etcd) so every pod sees every registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.protocol.errors import ModelNotFound


def model_key(name: str, version: str | None) -> str:
    return f"{name}/{version}" if version else name


def version_order(v: str) -> tuple[int, int, str]:
    """Numeric versions sort numerically and after named ones."""
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


@dataclass(eq=False)
class Registration:
    key: str
    name: str
    version: str  # "" when the model has none
    spec: Any
    origin: Path | None = None  # the directory whose settings file registered it
    disk_bytes: int = 0  # size of its files: the size prediction before a load


class ModelRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, Registration]] = {}
        self._by_key: dict[str, Registration] = {}

    def add(self, name: str, version: str | None, spec: Any, origin: Path | None = None) -> Registration:
        """Register (or re-register, keeping what was measured) a model version."""
        key = model_key(name, version)
        reg = self._by_key.get(key)
        if reg is None:
            reg = self._by_key[key] = Registration(key, name, version or "", spec, origin)
            self._by_name.setdefault(name, {})[reg.version] = reg
        else:
            reg.spec = spec
            reg.origin = origin or reg.origin
        return reg

    def get(self, key: str) -> Registration | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    def _versions(self, name: str) -> dict[str, Registration]:
        versions = self._by_name.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        return versions

    def resolve(self, name: str, version: str | None = None, ready: Callable[[str], bool] | None = None) -> str:
        """The key for a name and optional version; with none, the latest (preferring ready ones)."""
        versions = self._by_name.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found")
        if version:
            reg = versions.get(version)
            if reg is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r}")
            return reg.key
        if len(versions) == 1:
            return next(iter(versions.values())).key
        live = [v for v, reg in versions.items() if ready is None or ready(reg.key)]
        return versions[max(live or versions, key=version_order)].key

    def versions(self, name: str) -> list[str]:
        return sorted((v for v in self._by_name.get(name, {}) if v), key=version_order)

    def keys(self, name: str) -> list[str]:
        return [reg.key for reg in self._versions(name).values()]
