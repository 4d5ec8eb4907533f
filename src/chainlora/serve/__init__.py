"""Stage `serve`: `chainlora serve`, an OpenAI-compatible HTTP server in front of a chain.

A completion request passes, in order:
    guard.py      ASGI middleware: the API key and the body's size and pace, before any work
    routes.py     the HTTP routes, module-level handlers reading `request.app.state.server`
    prepare.py    raw body -> scheduler Request (parse, validate, render, tokenize) off the loop
    local.py      answered here: queue it, wait or stream, map the outcome to OpenAI errors
    forward.py    `--backend openai`: route here, answer on another OpenAI-compatible server
    responses.py  every OpenAI response body and stream chunk, local or forwarded
    logprob_fields.py  OpenAI's logprobs fields (completions' and chat's) from the engine's entries

and around them:
    app.py        create_app (assembles the app) and serve (loads the engine, runs uvicorn)
    settings.py   ServeSettings: every serve option and its default (CLI, Server, serve)
    server.py     Server: the engine, settings, preparer, scheduler, metrics, forwarder
    catalog.py    the model names a client may send (chain, mixed, tasks, base) and what each pins
    scheduler.py  window batching: concurrent requests become ONE mixed-adapter generate call
    streamer.py   a batch's streamed text (and logprobs), row by row, as generate makes it
    connections.py  uvicorn's h11 protocol plus a header deadline and a connection cap
    limits.py     what one request may cost (each limit a `serve` option)
    schema.py     the OpenAI wire format: request bodies and the error shape
    errors.py     ApiError and every error (FastAPI's and Starlette's too) in OpenAI's shape
    openapi.py    /openapi.json with the real request bodies and error responses
    llamacpp.py   `--backend llamacpp`: forward.py's client for llama-server's per-request LoRA
    metrics.py    the Prometheus metrics at GET /metrics
    playground.py the playground page at / (static/), GET /v1/library and the read-only report

A new serving backend goes here, beside forward.py (named in settings.BACKENDS, built in
app.forwarder_for). No part holds the Server: each gets the engine and settings it needs.
May import: core, data, library, inference, train, eval.
"""


def __getattr__(name: str):
    """`from chainlora.serve import Server, create_app, serve`, loading FastAPI only when used."""
    if name in ("Server", "create_app", "serve"):
        from chainlora.serve import app

        return getattr(app, name)
    if name == "ServeSettings":
        from chainlora.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeSettings", "Server", "create_app", "serve"]
