"""The model server as the sidecar sees it: its public REST API, nothing else.

Trained models are (re)loaded with the repository extension (``POST
/v2/repository/models/{name}/load`` with the model's settings as ``parameters.config``),
so the sidecar runs beside any meshserve process, in the same pod or on the same machine.
"""

from __future__ import annotations

from typing import Any

import httpx
from meshserve.adapters.settings import AdaptersSettings


class ModelServerError(Exception):
    """The model server refused or could not be reached; the message says which."""


class ModelServer:
    def __init__(self, url: str, token: str | None = None, verify: bool = True, timeout: float = 600) -> None:
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=self.url, headers=self.headers, verify=verify, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: AdaptersSettings) -> ModelServer:
        token = settings.model_server_token.get_secret_value() if settings.model_server_token else None
        return cls(settings.model_server_url, token, settings.model_server_verify)

    async def close(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, doc: dict[str, Any]) -> Any:
        try:
            r = await self._client.post(path, json=doc)
        except httpx.HTTPError as e:
            raise ModelServerError(f"model server {self.url} unreachable ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text
            raise ModelServerError(f"model server answered {r.status_code}: {message}")
        return r.json() if r.content else {}

    async def load(self, name: str, config: dict[str, Any] | None = None) -> None:
        body = {"parameters": {"config": config}} if config is not None else {}
        await self._post(f"/v2/repository/models/{name}/load", body)

    async def unload(self, name: str) -> None:
        await self._post(f"/v2/repository/models/{name}/unload", {})

    async def index(self, ready: bool = False) -> list[dict[str, Any]]:
        return await self._post("/v2/repository/index", {"ready": ready})

    async def infer(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._post(f"/v2/models/{name}/infer", request)
