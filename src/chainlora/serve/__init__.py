"""Stage `serve`: `chainlora serve`, an OpenAI-compatible HTTP server in front of a chain.

    app.py        the FastAPI app: Server (routing, streaming), create_app, serve
    guard.py      ASGI middleware: the API key and the body's size and pace, before any work
    connections.py  uvicorn's h11 protocol plus a header deadline and a connection cap
    limits.py     what one request may cost (each limit a `serve` option)
    prepare.py    raw body -> scheduler Request (parse, validate, render, tokenize) off the loop
    scheduler.py  window batching: concurrent requests become ONE mixed-adapter generate call
    schema.py     the OpenAI wire format: request bodies, the error shape, response pieces
    errors.py     every error (FastAPI's and Starlette's too) in OpenAI's shape
    openapi.py    /openapi.json with the real request bodies and error responses
    forward.py    `--backend openai`: route here, answer on another OpenAI-compatible server
    metrics.py    the Prometheus metrics at GET /metrics

A new serving backend goes here, beside forward.py (chosen in app.py's `serve`).
May import: core, data, library, inference, train, eval.
"""


def __getattr__(name: str):
    """`from chainlora.serve import Server, create_app, serve`, loading FastAPI only when used."""
    if name in ("Server", "create_app", "serve"):
        from chainlora.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Server", "create_app", "serve"]
