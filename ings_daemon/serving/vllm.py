"""A vLLM server's adapter API, as the serving sync and the persona chat use it.

    GET  /v1/models                 the base model and every loaded adapter (`parent` set)
    POST /v1/load_lora_adapter      {lora_name, lora_path}; needs VLLM_ALLOW_RUNTIME_LORA_UPDATING
    POST /v1/unload_lora_adapter    {lora_name}

Answers are sorted into three kinds: success (a load of a name already loaded, an unload of a
name not loaded: both are the state asked for), `ServerDown` (no answer, a timeout, 502/503/
504: retried with backoff) and `Refused` (any other error: the server read the request and
said no, such as "LoRA rank 32 is greater than max_lora_rank 16", which vLLM answers with
500; trying again would get the same answer).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from pydantic import SecretStr

REQUEST_TIMEOUT_S = 60.0
DOWN_STATUSES = frozenset({502, 503, 504})


class ServerDown(Exception):
    """The server did not answer (or answered that it cannot now); str() says why."""


class Refused(Exception):
    """The server answered the request with an error that a retry would repeat."""


def _message(status: int, text: str) -> str:
    """The error message of an OpenAI-style error body, else the body's start."""
    try:
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else None
    except ValueError:
        message = None
    return f"HTTP {status}: {str(message or text)[:500]}"


class VllmServer:
    """One server at `url` (no trailing slash). Methods raise ServerDown or Refused."""

    def __init__(self, url: str, api_key: SecretStr | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The client session, made in the running loop on first use."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        try:
            async with self.session().request(method, self.url + path, json=body) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ServerDown(f"{self.url}: {type(exc).__name__}: {str(exc)[:300]}") from exc

    async def models(self) -> list[dict[str, Any]]:
        """The `data` list of GET /v1/models: `{"id", "parent", "root", ...}` per model."""
        status, text = await self._call("GET", "/v1/models")
        if status in DOWN_STATUSES:
            raise ServerDown(f"{self.url}: {_message(status, text)}")
        if status != 200:
            raise Refused(_message(status, text))
        try:
            data = json.loads(text)["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerDown(f"{self.url}: /v1/models is not an OpenAI model list: {exc}") from exc
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def load(self, name: str, path: str) -> None:
        """Load the adapter folder `path` (as the server sees it) under `name`."""
        status, text = await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 200 or (status == 400 and "already been loaded" in text):
            return
        if status in DOWN_STATUSES:
            raise ServerDown(f"{self.url}: {_message(status, text)}")
        raise Refused(_message(status, text))

    async def unload(self, name: str) -> None:
        """Unload `name`; one that is not loaded is already in the state asked for."""
        status, text = await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status in (200, 404):
            return
        if status in DOWN_STATUSES:
            raise ServerDown(f"{self.url}: {_message(status, text)}")
        raise Refused(_message(status, text))
