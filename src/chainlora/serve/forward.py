"""`chainlora serve --backend openai`: route locally, answer on another OpenAI-compatible server.

Only the task selector runs here (base model + router adapter); each request is sent on to the
backend (vLLM serving the library's adapters with --enable-lora, see `chainlora export --format
vllm`, or another chainlora server) with `model` set to the chosen adapter.

The backend must answer the prompt the adapters were trained on, so nothing is left for it to
render: the chat template and the library's system prompt are applied here, exactly as on the
local path (`prompts.ids`), and every request goes to `/v1/completions` as token ids. Its text
completion comes back in the shape the client asked for (chat or completion, streaming or not)
with the routing decision added in the `chainlora` field; a stream always ends with [DONE].
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from chainlora.errors import ChainloraError
from chainlora.inference.engine import BASE, Route

PATH = "/completions"
# validated sampling fields (schema.py) the backend reads as OpenAI/vLLM do; nothing else is sent
PASSED = ("seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p",
          "repetition_penalty")


def completion_body(body: Any, req: Any, model: str, ids: list[int]) -> dict:
    """The backend's request: a completion of the rendered prompt's token ids, with every
    sampling parameter explicit (so the backend's own defaults never decide them)."""
    out = {"model": model, "prompt": ids, "max_tokens": req.max_tokens, "temperature": req.temperature,
           "top_p": req.top_p, "stream": bool(body.stream)}
    if req.stop:
        out["stop"] = list(req.stop)
    if body.stream and body.stream_options:
        out["stream_options"] = {"include_usage": body.stream_options.include_usage}
    out.update({k: getattr(body, k) for k in PASSED if k in body.model_fields_set and getattr(body, k) is not None})
    return out


def reply(data: Any, kind: str, model: str, route_field: dict | None) -> Any:
    """The backend's text completion as the client asked for it (`kind` chat or text)."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return data
    data = {**data, "model": model, "chainlora": route_field}
    if kind == "chat":
        data["id"] = "chatcmpl-" + str(data.get("id", "")).removeprefix("cmpl-")
        data["object"] = "chat.completion"
        data["choices"] = [{"index": c.get("index", 0), "finish_reason": c.get("finish_reason"), "logprobs": None,
                            "message": {"role": "assistant", "content": c.get("text") or ""}}
                           for c in data["choices"] if isinstance(c, dict)]
    return data


def chunks(data: dict, kind: str, model: str, route_field: dict | None, started: set) -> list[dict]:
    """One backend stream chunk as the client's chunks; a chat stream's first chunk of each
    choice carries the assistant role, as OpenAI's does (`started`: the choices that had it)."""
    data = {**data, "model": model, "chainlora": route_field}
    if kind != "chat":
        return [data]
    data["id"] = "chatcmpl-" + str(data.get("id", "")).removeprefix("cmpl-")
    data["object"] = "chat.completion.chunk"
    out, choices = [], []
    for c in data.get("choices") or []:
        i = c.get("index", 0)
        if i not in started:
            started.add(i)
            out.append({**data, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
        text = c.get("text") or ""
        choices.append({"index": i, "delta": {"content": text} if text else {},
                        "finish_reason": c.get("finish_reason"), "logprobs": None})
    if choices or not out:  # a usage-only chunk (choices: []) goes on as it is
        out.append({**data, "choices": choices})
    return out


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

    async def complete(self, body: dict) -> tuple[int, dict]:
        """One non-streaming call; (status, JSON body) as the backend answered."""
        import httpx

        try:
            r = await self.client.post(f"{self.url}{PATH}", json=body)
        except httpx.HTTPError as e:
            return 502, _error(f"backend {self.url} unreachable: {e.__class__.__name__}")
        try:
            return r.status_code, r.json()
        except json.JSONDecodeError:
            return 502, _error(f"backend answered {r.status_code} with a body that is not JSON")

    async def stream(self, body: dict, kind: str, model: str, route_field: dict | None) -> AsyncIterator[str]:
        """The backend's server-sent events as the client's chunks; [DONE] comes last whatever
        happens (a backend error, a dropped connection, a backend that forgets it)."""
        async for event in self._events(body, kind, model, route_field):
            yield event
        yield "data: [DONE]\n\n"

    async def _events(self, body: dict, kind: str, model: str, route_field: dict | None) -> AsyncIterator[str]:
        import httpx

        started: set = set()
        try:
            async with self.client.stream("POST", f"{self.url}{PATH}", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    try:
                        json.loads(text)
                    except json.JSONDecodeError:
                        text = json.dumps(_error(f"backend answered {r.status_code}: {text[:200]}"))
                    yield f"data: {text}\n\n"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError:
                        continue
                    if not isinstance(chunk, dict) or "error" in chunk:
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                        continue
                    for out in chunks(chunk, kind, model, route_field, started):
                        yield f"data: {json.dumps(out, ensure_ascii=False)}\n\n"
        except httpx.HTTPError as e:
            yield f"data: {json.dumps(_error(f'backend {self.url}: {e.__class__.__name__}'))}\n\n"
        except asyncio.CancelledError:  # our client left: closing the stream frees the backend's row
            raise

    async def close(self) -> None:
        await self.client.aclose()


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "backend_error"}}
