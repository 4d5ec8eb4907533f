"""The HTTP routes, as module-level handlers on one APIRouter.

Each handler reads the `Server` from `request.app.state.server` (app.py puts it there). A
completion request runs: `chat` / `completions` -> `Preparer.submit` (prepare.py: parse,
validate, render, tokenize, off the loop) -> `local.answer` (the scheduler here) or
`forward.answer` (another server) -> responses.py (the OpenAI shape).

The completion routes read their body themselves (so it is parsed off the event loop), which
is why their request body is documented by hand (`documented.body`, openapi.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest  # module level: FastAPI resolves annotations here
from fastapi.responses import JSONResponse, PlainTextResponse

from chainlora.errors import ChainloraError
from chainlora.serve import forward, local
from chainlora.serve.errors import ApiError
from chainlora.serve.guard import LOOPBACK, authorized
from chainlora.serve.openapi import documented
from chainlora.serve.schema import ChatBody, CompletionBody
from chainlora.serve.server import Server

router = APIRouter()
COMPLETION_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 500, 503)
PROMETHEUS = {200: {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def server_of(request: HttpRequest) -> Server:
    return request.app.state.server


@router.get("/health", responses=documented(503))
async def health(request: HttpRequest) -> JSONResponse:
    """Liveness. Without a key (or with the right one) it also names the models and the queue;
    with a key set and none sent, only the status: nothing about the library."""
    server = server_of(request)
    alive = server.scheduler.thread.is_alive()
    body: dict[str, Any] = {"status": "ok" if alive else "worker stopped"}
    if authorized(server.api_key, request.scope["headers"]):
        body.update(waiting=server.scheduler.waiting, models=server.models())
    return JSONResponse(body, status_code=200 if alive else 503)


@router.get("/metrics", responses={**documented(401), **PROMETHEUS})
async def metrics(request: HttpRequest) -> PlainTextResponse:
    return PlainTextResponse(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", responses=documented(401), response_model=None)
async def models(request: HttpRequest) -> dict:
    server = server_of(request)
    return {"object": "list", "data": [{"id": m, "object": "model", "created": server.created,
                                        "owned_by": "chainlora"} for m in server.models()]}


def _local_json(request: HttpRequest) -> None:
    """Without a key, reload comes only from loopback and with a JSON content type, which a web
    page cannot send to another origin without a CORS preflight this server never grants."""
    if (request.client.host if request.client else "") not in LOOPBACK:
        raise ApiError(403, "reload: without --api-key only from loopback", code="forbidden")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "reload: send Content-Type: application/json", code="unsupported_media_type")


def relative(message: str, root: Path) -> str:
    """`message` with the library's location taken out: paths in it named relative to the library
    (a client learns nothing of the server's disk)."""
    for where in sorted({str(root.resolve()), str(root.absolute()), str(root)}, key=len, reverse=True):
        message = message.replace(where + os.sep, "").replace(where, "the library")
    return message


@router.post("/v1/adapters/reload", responses=documented(400, 401, 403, 415), response_model=None)
async def reload(request: HttpRequest) -> dict:
    """Rescan the library. With a key set it needs the key (the Guard); without one, see `_local_json`."""
    server = server_of(request)
    if server.api_key is None:
        _local_json(request)
    try:
        changes = await asyncio.to_thread(server.engine.reload)
    except ChainloraError as e:
        raise ApiError(400, relative(str(e), server.engine.lib.root), code="reload_failed")
    return {"object": "reload", **changes, "models": server.models()}


async def answer(request: HttpRequest, kind: str) -> Any:
    """A completion of `kind` ("chat" or "text"): prepared here, answered here or forwarded."""
    server = server_of(request)
    body, reqs = await server.preparer.submit(kind, await request.body(), request.is_disconnected)
    t0 = time.monotonic()
    if server.forwarder is not None:
        return await forward.answer(server, forward.one(reqs), body, kind, t0)
    return await local.answer(server, request, reqs, body, kind, t0)


@router.post("/v1/chat/completions", openapi_extra=documented.body(ChatBody),
             responses=documented(*COMPLETION_ERRORS, streams=True), response_model=None)
async def chat(request: HttpRequest) -> Any:
    return await answer(request, "chat")


@router.post("/v1/completions", openapi_extra=documented.body(CompletionBody),
             responses=documented(*COMPLETION_ERRORS, streams=True), response_model=None)
async def completions(request: HttpRequest) -> Any:
    return await answer(request, "text")
