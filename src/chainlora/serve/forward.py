"""`chainlora serve --backend openai`: route locally, answer on another OpenAI-compatible server.

Only the task selector runs here (base model + router adapter); each request is sent on to the
backend (vLLM serving the library's adapters with --enable-lora, see `chainlora export --format
vllm`, or another chainlora server) with `model` set to the chosen adapter, and the backend's
answer comes back with the routing decision added in the `chainlora` field — streaming
included, chunk by chunk. So one small router fronts a cluster that does the batching.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from chainlora.errors import ChainloraError
from chainlora.inference.engine import BASE, Route


class Forwarder:
    """The HTTP side of forwarding: one pooled async client for the backend."""

    def __init__(self, url: str, *, api_key: str | None = None, base_model: str | None = None,
                 timeout_s: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.base_model = base_model  # what the backend calls the bare base model (fallback rows)

    def model_for(self, route: Route) -> str:
        if route.adapter == BASE:
            if not self.base_model:
                raise ChainloraError("no adapter fits this request and --backend-base-model is not set")
            return self.base_model
        return route.adapter

    async def complete(self, path: str, body: dict) -> tuple[int, dict]:
        """One non-streaming call; (status, JSON body) as the backend answered."""
        import httpx

        try:
            r = await self.client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as e:
            return 502, _error(f"backend {self.url} unreachable: {e.__class__.__name__}")
        try:
            return r.status_code, r.json()
        except json.JSONDecodeError:
            return 502, _error(f"backend answered {r.status_code} with a body that is not JSON")

    async def stream(self, path: str, body: dict, route_field: dict) -> AsyncIterator[str]:
        """Server-sent events from the backend, each data chunk with the routing field added."""
        import httpx

        try:
            async with self.client.stream("POST", f"{self.url}{path}", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    yield f"data: {text}\n\n"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        yield "data: [DONE]\n\n"
                        return
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(chunk, dict) and "error" not in chunk:
                        chunk["chainlora"] = route_field
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except httpx.HTTPError as e:
            yield f"data: {json.dumps(_error(f'backend {self.url}: {e.__class__.__name__}'))}\n\n"
        except asyncio.CancelledError:  # our client left: closing the stream frees the backend's row
            raise

    async def close(self) -> None:
        await self.client.aclose()


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "backend_error"}}
