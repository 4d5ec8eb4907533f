"""`chainlora serve --backend openai`: route locally, answer on another OpenAI-compatible server.

Only the task selector runs here (base model + router adapter); each request is sent on to the
backend (vLLM serving the library's adapters with --enable-lora, see `chainlora export --format
vllm`, or another chainlora server) with `model` set to the chosen adapter.

The backend must answer the prompt the adapters were trained on, so nothing is left for it to
render: the chat template and the library's system prompt are applied here, exactly as on the
local path (`prompts.ids`), and every request goes to `/v1/completions` as token ids. Its text
completion comes back in the shape the client asked for (chat or completion, streaming or not)
with the routing decision added in the `chainlora` field (responses.py shapes it); a stream
always ends with [DONE]. `answer` is the route's side: it runs the selector here, then the
`Forwarder` (the HTTP client) asks the backend.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from chainlora.errors import ChainloraError, NotFound
from chainlora.inference.engine import BASE, Route
from chainlora.serve import responses
from chainlora.serve.errors import ApiError
from chainlora.serve.responses import backend_error
from chainlora.serve.scheduler import Request
from chainlora.serve.schema import Sampling
from chainlora.serve.settings import DEFAULTS

if TYPE_CHECKING:
    from chainlora.serve.server import Server

PATH = "/completions"
# validated sampling fields (schema.py) the backend reads as OpenAI/vLLM do; nothing else is sent
PASSED = ("seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p",
          "repetition_penalty", "ignore_eos", "min_tokens")


def completion_body(body: Sampling, req: Request, model: str, ids: list[int]) -> dict:
    """The backend's request: a completion of the rendered prompt's token ids, with every
    sampling parameter explicit (so the backend's own defaults never decide them)."""
    out = {"model": model, "prompt": ids, "max_tokens": req.max_tokens, "temperature": req.temperature,
           "top_p": req.top_p, "stream": bool(body.stream)}
    if req.stop:
        out["stop"] = list(req.stop)
    if req.logprobs is not None:  # chat's top_logprobs too: the backend answers a completion
        out["logprobs"] = req.logprobs
    if req.echo is not None:
        out["echo"] = True
    if body.stream and body.stream_options:
        out["stream_options"] = {"include_usage": body.stream_options.include_usage}
        if body.stream_options.continuous_usage_stats:  # vLLM's; sent only when asked
            out["stream_options"]["continuous_usage_stats"] = True
    out.update({k: getattr(body, k) for k in PASSED if k in body.model_fields_set and getattr(body, k) is not None})
    return out


class Forwarder:
    """The HTTP side of forwarding: one pooled async client for the backend."""

    def __init__(self, url: str, *, api_key: str | None = None, base_model: str | None = None,
                 timeout_s: float = DEFAULTS.timeout_s):
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.base_model = base_model  # what the backend calls the bare base model (fallback rows)
        self.echoes = True  # the backend answers `echo` (vLLM, another chainlora server)

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
            return 502, backend_error(f"backend {self.url} unreachable: {e.__class__.__name__}")
        try:
            return r.status_code, r.json()
        except json.JSONDecodeError:
            return 502, backend_error(f"backend answered {r.status_code} with a body that is not JSON")

    async def stream(self, body: dict, kind: str, model: str, route_field: dict | None) -> AsyncIterator[str]:
        """The backend's server-sent events as the client's chunks; [DONE] comes last whatever
        happens (a backend error, a dropped connection, a backend that forgets it)."""
        async for event in self._events(body, kind, model, route_field):
            yield event
        yield responses.DONE

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
                        text = json.dumps(backend_error(f"backend answered {r.status_code}: {text[:200]}"))
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
                        yield responses.sse(chunk)
                        continue
                    for out in responses.chunks(chunk, kind, model, route_field, started):
                        yield responses.sse(out)
        except httpx.HTTPError as e:
            yield responses.sse(backend_error(f"backend {self.url}: {e.__class__.__name__}"))
        except asyncio.CancelledError:  # our client left: closing the stream frees the backend's row
            raise

    async def close(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------- the route


def one(reqs: list[Request]) -> Request:
    """The one prompt a forwarded request may carry (several: a 400)."""
    if len(reqs) != 1:
        raise ApiError(400, "prompt: send one prompt per request to a server that forwards (--backend)",
                       param="prompt")
    return reqs[0]


async def _route(server: Server, req: Request) -> tuple[Route, str]:
    """Route here (the selector runs off the event loop); the backend's model for the route."""
    try:
        (route,) = await asyncio.to_thread(server.engine.routes_for, [req.text], [req.task])
        return route, server.forwarder.model_for(route)
    except NotFound as e:
        raise ApiError(404, str(e), param="model", code="model_not_found")
    except ChainloraError as e:
        raise ApiError(500, str(e), type="server_error")


async def answer(server: Server, req: Request, body: Sampling, kind: str, t0: float) -> Any:
    """Route here, answer on the backend: its completion of the token ids prepared here, in the
    shape the client asked for (a stream or one JSON body)."""
    if req.echo is not None and not server.forwarder.echoes:
        raise ApiError(400, "echo: this backend does not return the prompt's tokens (llama-server refuses echo); "
                            "serve without --backend to score prompts", param="echo", code="unsupported_parameter")
    route, model = await _route(server, req)
    payload = completion_body(body, req, model, list(req.rendered))  # token ids (prepare.py)
    rf = responses.route_field(route)
    server.metrics.routed.labels(route.adapter, str(route.fallback).lower()).inc()
    if body.stream:
        return responses.event_stream(server.forwarder.stream(payload, kind, body.model, rf))
    status, data = await server.forwarder.complete(payload)
    server.metrics.answered(kind, status, time.monotonic() - t0)
    return responses.forwarded(status, data, kind, body.model, rf)
