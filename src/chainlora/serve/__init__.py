"""Stage `serve`: `chainlora serve`, an OpenAI-compatible HTTP server in front of a chain.

    app.py        the FastAPI app: Server (routing, streaming, auth), create_app, serve
    scheduler.py  window batching: concurrent requests become ONE mixed-adapter generate call
    schema.py     the OpenAI wire format: request bodies, the error shape, response pieces
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
