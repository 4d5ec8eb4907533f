"""`chainlora serve`: an OpenAI-compatible HTTP server in front of a routed chain.

    GET  /v1/models                 chain, mixed, every task adapter
    POST /v1/chat/completions       OpenAI chat (streaming: server-sent events, [DONE])
    POST /v1/completions            OpenAI completions (the prompt is the instruction)
    POST /v1/adapters/reload        rescan the library (the key; without one: loopback + JSON)
    GET  /health, GET /metrics      liveness; Prometheus text

`model: "chain"` routes with the library's selector, `"<task>"` pins an adapter, `"mixed"` uses
the mixed one. Every response carries the routing decision in an extra `chainlora` field.
A request passes the Guard (key, body size and pace: guard.py), becomes a scheduler Request on
the preparer's thread (prepare.py) and is batched across adapters by `scheduler.Scheduler`;
every error is in OpenAI's JSON shape (errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import json
import sys
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request as HttpRequest  # module level: FastAPI resolves annotations here

from chainlora.errors import ChainloraError, NotFound
from chainlora.inference import selectors
from chainlora.inference.engine import Answer, Engine, Route
from chainlora.serve.guard import Guard, authorized
from chainlora.serve.limits import Limits
from chainlora.serve.metrics import Metrics
from chainlora.serve.prepare import CHAIN, MIXED, Preparer
from chainlora.serve.scheduler import QueueFull, Request, Scheduler, TimedOut, deliver
from chainlora.serve.schema import (ApiError, ChatBody, CompletionBody, Sampling, finish, route_field,
                                    usage)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
log = logging.getLogger("chainlora.serve")


# --------------------------------------------------------------------------- the app


class Server:
    """Everything a request handler needs: the chain, its scheduler, limits, metrics."""

    def __init__(self, engine: Engine, *, api_key: str | None = None, max_batch: int = 16,
                 window_ms: float = 10.0, max_queue: int = 256, timeout_s: float = 300.0,
                 default_max_tokens: int = 256, forwarder: Any = None, limits: Limits | None = None):
        self.engine, self.api_key, self.timeout = engine, api_key or None, timeout_s
        self.forwarder = forwarder  # forward.Forwarder: answer on another server, route here
        self.default_max_tokens = default_max_tokens
        self.limits = limits or Limits()
        if max_queue < 1 or timeout_s <= 0 or max_batch < 1:
            raise ChainloraError("serve: --max-queue and --max-batch must be >= 1, --timeout > 0")
        self.preparer = Preparer(self)  # bodies become Requests on its own thread (prepare.py)
        self.metrics = Metrics(engine)
        self.scheduler = Scheduler(engine, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue,
                                   on_batch=self.metrics.batch)
        self.created = int(time.time())

    def models(self) -> list[str]:
        lib = self.engine.lib
        return [CHAIN] + ([MIXED] if lib.mixed else []) + lib.task_names

    def pin(self, model: str) -> str | None:
        """The adapter a `model` names (None: route), or 404."""
        if model == CHAIN:
            if len(self.engine.tasks) != 1 and self.engine.selector not in selectors.available(self.engine.lib):
                raise ApiError(404, f"model 'chain' needs a task selector; this library has none "
                                    f"(use one of: {', '.join(self.models()[1:])})", param="model",
                               code="model_not_found")
            return None
        if model in self.models():
            return model
        raise ApiError(404, f"The model '{model[:100]}' does not exist (models: {', '.join(self.models())})",
                       param="model", code="model_not_found")

    def close(self) -> None:
        self.scheduler.close()
        self.preparer.close()

    async def run(self, req: Request, is_disconnected) -> Answer:
        """Queue the request and wait for its answer; a client that leaves cancels it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        req.done = deliver(loop, future)
        self.submit(req)
        give_up = req.deadline + 30.0  # a backstop: the worker resolves every request before this
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=0.25)
                if not future.done() and (await is_disconnected() or time.monotonic() > give_up):
                    req.cancelled.set()
                    if time.monotonic() > give_up:
                        raise ApiError(503, "timed out: no answer in time", type="server_error", code="timeout")
        except asyncio.CancelledError:  # the handler itself was cancelled: stop the row too
            req.cancelled.set()
            raise
        return self.result(future)

    def submit(self, req: Request) -> None:
        try:
            self.scheduler.submit(req)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise ApiError(429, f"server busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})

    def result(self, future: asyncio.Future) -> Answer:
        try:
            return future.result()
        except TimedOut as e:
            raise ApiError(503, f"timed out: {e}", type="server_error", code="timeout",
                           headers={"Retry-After": "1"})
        except NotFound as e:  # its task or adapter left the library (a reload) while it waited
            raise ApiError(404, str(e), param="model", code="model_not_found")
        except ChainloraError as e:  # e.g. its adapter's file is corrupt: names the adapter
            raise ApiError(500, str(e), type="server_error")
        except asyncio.CancelledError:
            raise ApiError(499, "the request was cancelled", type="server_error", code="cancelled")
        except Exception as e:  # a bug: logged by the scheduler; the client still gets JSON
            raise ApiError(500, f"internal error: {e.__class__.__name__}: {e}", type="server_error")


def create_app(server: Server):
    """The FastAPI application around a Server, behind the Guard (key first, bounded body)."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from chainlora.serve.errors import install_handlers
    from chainlora.serve.openapi import documented, install_openapi

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()
        if server.forwarder is not None:
            await server.forwarder.close()

    # no /docs or /redoc: they load their scripts from a CDN; /openapi.json stays (behind the key)
    app = FastAPI(title="chainlora", version=__import__("chainlora").__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Guard, api_key=server.api_key, limits=server.limits, on_refused=server.metrics.status)
    install_handlers(app, server.metrics)
    install_openapi(app, server.models, forwarding=server.forwarder is not None)

    @app.get("/health", responses=documented(503))
    async def health(request: HttpRequest):
        """Liveness. Without a key (or with the right one) it also names the models and the queue;
        with a key set and none sent, only the status: nothing about the library."""
        alive = server.scheduler.thread.is_alive()
        body: dict[str, Any] = {"status": "ok" if alive else "worker stopped"}
        if authorized(server.api_key, request.scope["headers"]):
            body.update(waiting=server.scheduler.waiting, models=server.models())
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", responses={**documented(401), 200: {"description": "Prometheus text", "content": {
        "text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=documented(401))
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": server.created,
                                            "owned_by": "chainlora"} for m in server.models()]}

    @app.post("/v1/adapters/reload", responses=documented(400, 401, 403, 415))
    async def reload(request: HttpRequest):
        """Rescan the library. With a key set it needs the key (the Guard); without one, only
        from loopback and with a JSON content type, which a web page cannot send to another
        origin without a CORS preflight this server never grants."""
        if server.api_key is None:
            if (request.client.host if request.client else "") not in LOOPBACK:
                raise ApiError(403, "reload: without --api-key only from loopback", code="forbidden")
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise ApiError(415, "reload: send Content-Type: application/json", code="unsupported_media_type")
        try:
            changes = await asyncio.to_thread(server.engine.reload)
        except ChainloraError as e:
            raise ApiError(400, str(e), code="reload_failed")
        return {"object": "reload", **changes, "models": server.models()}

    async def answer(request: HttpRequest, req: Request, body: Sampling, kind: str):
        t0 = time.monotonic()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if server.forwarder is not None:
            return await forward(req, body, kind, t0)
        if body.stream:  # queued before the response starts, so a full queue is still a 429
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            future: asyncio.Future = loop.create_future()
            req.on_route = lambda r: loop.call_soon_threadsafe(events.put_nowait, ("route", r))
            req.on_text = lambda t: loop.call_soon_threadsafe(events.put_nowait, ("text", t))
            req.done = deliver(loop, future)
            future.add_done_callback(lambda f: events.put_nowait(("done", None)))
            server.submit(req)
            return StreamingResponse(stream(req, events, future, body, kind, rid, t0),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        route: list[Route] = []
        req.on_route = route.append
        a = await server.run(req, request.is_disconnected)
        server.metrics.done(kind, a, time.monotonic() - t0)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": a.text},
                      "finish_reason": finish(a.finish_reason), "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": a.text, "finish_reason": finish(a.finish_reason), "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": body.model,
                "choices": [choice], "usage": usage(a), "chainlora": route_field(a.route)}

    async def forward(req: Request, body: Sampling, kind: str, t0: float):
        """Route here, answer on the backend (see chainlora.serve.forward)."""
        from chainlora.serve.forward import completion_body, reply

        try:
            (route,) = await asyncio.to_thread(server.engine.routes_for, [req.text], [req.task])
            model = server.forwarder.model_for(route)
        except NotFound as e:
            raise ApiError(404, str(e), param="model", code="model_not_found")
        except ChainloraError as e:
            raise ApiError(500, str(e), type="server_error")
        payload = completion_body(body, req, model, list(req.rendered))  # token ids (prepare.py)
        rf = route_field(route)
        server.metrics.routed.labels(route.adapter, str(route.fallback).lower()).inc()
        if body.stream:
            return StreamingResponse(server.forwarder.stream(payload, kind, body.model, rf),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        status, data = await server.forwarder.complete(payload)
        server.metrics.answered(kind, status, time.monotonic() - t0)
        return JSONResponse(reply(data, kind, body.model, rf) if status == 200 else data, status_code=status)

    async def stream(req: Request, events: asyncio.Queue, future: asyncio.Future, body: Sampling, kind: str,
                     rid: str, t0: float) -> AsyncIterator[str]:
        created, obj = int(time.time()), "chat.completion.chunk" if kind == "chat" else "text_completion"
        route = None

        def chunk(delta: dict | str, reason: str | None = None, **extra: Any) -> str:
            choice = ({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None} if kind == "chat"
                      else {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None})
            data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice],
                    "chainlora": route_field(route), **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            give_up = req.deadline + 30.0  # a backstop: the worker resolves every request before this
            while True:
                try:
                    what, value = await asyncio.wait_for(events.get(), max(give_up - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    req.cancelled.set()
                    error = ApiError(503, "timed out: no answer in time", type="server_error", code="timeout")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if what == "route":
                    route = value
                    if kind == "chat":
                        yield chunk({"role": "assistant", "content": ""})
                elif what == "text":
                    yield chunk({"content": value} if kind == "chat" else value)
                else:
                    break
            try:
                a = server.result(future)
            except ApiError as e:  # an error event, then the end of the stream as always
                yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            server.metrics.done(kind, a, time.monotonic() - t0)
            yield chunk({} if kind == "chat" else "", finish(a.finish_reason))
            if body.stream_options is not None and body.stream_options.include_usage:
                data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                        "usage": usage(a), "chainlora": route_field(route)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                req.cancelled.set()  # the client went away: its row stops at the next token

    codes = (400, 401, 404, 408, 413, 429, 500, 503)

    @app.post("/v1/chat/completions", openapi_extra=documented.body(ChatBody), responses=documented(*codes))
    async def chat(request: HttpRequest):
        body, req = await server.preparer.submit("chat", await request.body())
        return await answer(request, req, body, "chat")

    @app.post("/v1/completions", openapi_extra=documented.body(CompletionBody), responses=documented(*codes))
    async def completions(request: HttpRequest):
        body, req = await server.preparer.submit("text", await request.body())
        return await answer(request, req, body, "text")

    return app


def serve(library: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str | None = None, dtype: str = "float32", selector: str | None = None,
          threshold: float | None = None, novelty: bool = True, gate: bool = True,
          max_batch: int = 16, window_ms: float = 10.0, max_queue: int = 256, timeout_s: float = 300.0,
          max_adapters: int | None = None, cpu_cache_mb: float = 1024, backend: str = "local",
          backend_url: str | None = None, backend_key: str | None = None,
          backend_base_model: str | None = None, adapters: str = "pool", limits: Limits | None = None) -> None:
    """Load the library and serve it until interrupted."""
    import uvicorn

    from chainlora.serve.connections import bind, uvicorn_config

    forwarder = None
    if backend == "openai":
        from chainlora.serve.forward import Forwarder

        if not backend_url:
            raise ChainloraError("--backend openai needs --backend-url URL (e.g. http://vllm-host:8000/v1)")
        forwarder = Forwarder(backend_url, api_key=backend_key, base_model=backend_base_model, timeout_s=timeout_s)
    elif backend == "llamacpp":
        if not backend_url:
            raise ChainloraError("--backend llamacpp needs --backend-url URL (llama-server, e.g. http://127.0.0.1:8080)")
    elif backend != "local":
        raise ChainloraError(f"--backend: unknown {backend!r} (use local, openai or llamacpp)")
    limits = limits or Limits()
    sock = bind(host, port)  # before the model loads: a taken port fails at once
    if not api_key and host not in LOOPBACK:
        print(f"chainlora: warning: serving on {host} without an API key: anyone who reaches the port can use "
              "it (set --api-key-file or CHAINLORA_API_KEY)", file=sys.stderr)
    engine = Engine.load(library, device=device, dtype=dtype, selector=selector, threshold=threshold,
                         novelty=novelty, gate=gate, max_adapters=max_adapters,
                         cpu_cache_bytes=int(cpu_cache_mb * (1 << 20)), adapters=adapters)
    if backend == "llamacpp":  # it answers with every task adapter and the mixed one, by name
        from chainlora.serve.llamacpp import LlamaCppForwarder

        names = [e["name"] for e in engine.lib.tasks] + ([engine.lib.mixed["name"]] if engine.lib.mixed else [])
        forwarder = LlamaCppForwarder(backend_url, names, api_key=backend_key, timeout_s=timeout_s)
    server = Server(engine, api_key=api_key, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue,
                    timeout_s=timeout_s, forwarder=forwarder, limits=limits)
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    print(f"chainlora: serving {library} on http://{host}:{port}/v1 (models: {', '.join(server.models())})", flush=True)
    uvicorn.Server(uvicorn_config(create_app(server), limits, host=host, port=port,
                                  log_level="warning")).run(sockets=[sock])
