"""`chainlora serve`: an OpenAI-compatible HTTP server in front of a routed chain.

    GET  /v1/models                 chain, mixed, every task adapter
    POST /v1/chat/completions       OpenAI chat (streaming: server-sent events, [DONE])
    POST /v1/completions            OpenAI completions (the prompt is the instruction)
    POST /v1/adapters/reload        rescan the library (the key; without one: loopback + JSON)
    GET  /health, GET /metrics      liveness; Prometheus text
    GET  /, /playground             the playground page (playground.py), /v1/library for it

`model: "chain"` routes with the library's selector, `"<task>"` pins an adapter, `"mixed"` uses
the mixed one. Every response carries the routing decision in an extra `chainlora` field.
A request passes the Guard (key, body size and pace: guard.py), reaches its route (routes.py),
becomes a scheduler Request on the preparer's thread (prepare.py) and is batched across
adapters by `scheduler.Scheduler` (local.py) or answered by a backend (forward.py); every
error is in OpenAI's JSON shape (errors.py). This module only assembles the app and runs it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from chainlora.inference.engine import Engine
from chainlora.serve import playground, routes
from chainlora.serve.browser import Browser
from chainlora.serve.errors import install_handlers
from chainlora.serve.guard import LOOPBACK, Guard
from chainlora.serve.openapi import install_openapi
from chainlora.serve.server import Server
from chainlora.serve.settings import ServeSettings

__all__ = ["Server", "create_app", "serve"]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's shutdown stops its server's threads and closes the backend's client."""
    yield
    server: Server = app.state.server
    server.close()
    if server.forwarder is not None:
        await server.forwarder.close()


def create_app(server: Server) -> FastAPI:
    """The FastAPI application around a Server, behind the Guard (key first, bounded body)."""
    # no /docs or /redoc: they load their scripts from a CDN; /openapi.json stays (behind the key)
    app = FastAPI(title="chainlora", version=__import__("chainlora").__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = server
    s = server.settings
    app.add_middleware(Guard, api_key=server.api_key, limits=s.limits, on_refused=server.metrics.status,
                       browser=Browser(allowed_hosts=s.allowed_hosts, cors_origins=s.cors_origins,
                                       keyed=server.api_key is not None))
    install_handlers(app)
    install_openapi(app)
    app.include_router(routes.router)
    app.include_router(playground.router)
    return app


def forwarder_for(settings: ServeSettings, engine: Engine) -> Any:
    """The client of the backend that `--backend` names (None: this server answers)."""
    s = settings
    if s.backend == "openai":
        from chainlora.serve.forward import Forwarder

        return Forwarder(s.backend_url, api_key=s.backend_key, base_model=s.backend_base_model, timeout_s=s.timeout_s)
    if s.backend == "llamacpp":  # it answers with every task adapter and the mixed one, by name
        from chainlora.serve.llamacpp import LlamaCppForwarder

        names = [e["name"] for e in engine.lib.tasks] + ([engine.lib.mixed["name"]] if engine.lib.mixed else [])
        return LlamaCppForwarder(s.backend_url, names, api_key=s.backend_key, timeout_s=s.timeout_s,
                                 cache_prompt=s.backend_cache_prompt)
    return None


def load_engine(library: str, s: ServeSettings) -> Engine:
    """The library's engine, as the settings ask for it."""
    return Engine.load(library, device=s.device, dtype=s.dtype, selector=s.selector, threshold=s.threshold,
                       novelty=s.novelty, gate=s.gate, max_adapters=s.max_adapters,
                       cpu_cache_bytes=int(s.cpu_cache_mb * (1 << 20)), adapters=s.adapters)


def serve(library: str, settings: ServeSettings | None = None, **options: Any) -> None:
    """Load the library and serve it until interrupted; keywords replace fields of `settings`
    (`serve(LIB, port=8001)`), whose defaults are settings.py's."""
    import uvicorn

    from chainlora.serve.connections import bind, uvicorn_config

    s = ServeSettings.of(settings, **options)  # a bad --backend or size fails here, before anything
    sock = bind(s.host, s.port)  # before the model loads: a taken port fails at once
    if not s.api_key and s.host not in LOOPBACK:
        print(f"chainlora: warning: serving on {s.host} without an API key: anyone who reaches the port can use "
              "it (set --api-key-file or CHAINLORA_API_KEY); without a key, clients must name it by IP address "
              "or a name in --allowed-hosts", file=sys.stderr)
    engine = load_engine(library, s)
    server = Server(engine, s, forwarder=forwarder_for(s, engine))
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    where = f"[{s.host}]" if ":" in s.host else s.host
    print(f"chainlora: serving {library} on http://{where}:{port}/v1 (models: {', '.join(server.models())})\n"
          f"chainlora: playground at http://{where}:{port}/", flush=True)
    uvicorn.Server(uvicorn_config(create_app(server), s.limits, host=s.host, port=port,
                                  log_level="warning")).run(sockets=[sock])
