"""The server's door: authentication and the body's size and pace, before any work is done.

An ASGI middleware around the FastAPI app. It sees a request when its headers have arrived
and before a byte of its body is read, so:
- with an API key set, every route but `/health` needs `Authorization: Bearer KEY` (the
  scheme case-insensitive, the key compared in constant time): no key, no body read, 401;
- a `Content-Length` over the limit is a 413 at once; a chunked body is counted as it comes
  and refused at the limit; the whole body must arrive within the body timeout (408);
- the error responses close the connection, so an unread body cannot be replayed as the
  next request.
Slow or piled-up connections (headers that never end, too many sockets) are handled one
level down, in connections.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, Callable

from chainlora.serve.limits import Limits
from chainlora.serve.errors import ApiError

PUBLIC = frozenset({"/health"})  # answers without a key, with its status only
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # without a key: where reload may come from; no warning


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (any case of `Bearer`), else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def authorized(api_key: str | None, headers: list[tuple[bytes, bytes]]) -> bool:
    if api_key is None:
        return True
    token = bearer(headers)
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


async def respond(send: Callable, error: ApiError) -> None:
    """An OpenAI-shaped error sent straight from the middleware; the connection then closes."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()
                                             if k.lower() != "connection"]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


UNAUTHORIZED = ApiError(401, "Incorrect or missing API key (send Authorization: Bearer KEY)",
                        type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})


class Guard:
    """ASGI middleware: key first, then a bounded, timed body (see the module docstring)."""

    def __init__(self, app: Any, *, api_key: str | None, limits: Limits, on_refused: Callable | None = None):
        self.app, self.api_key, self.limits = app, api_key, limits
        self.on_refused = on_refused or (lambda path, status: None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self.check(scope)
        if error is not None:
            self.on_refused(scope["path"], error.status)
            return await respond(send, error)
        await self.app(scope, self.bounded(receive), send)

    def check(self, scope: dict) -> ApiError | None:
        if scope["path"] not in PUBLIC and not authorized(self.api_key, scope["headers"]):
            return UNAUTHORIZED
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return ApiError(400, "Content-Length: not a number of bytes", param="Content-Length")
            if int(length) > self.limits.max_body_bytes:
                return self.too_large()
        return None

    def too_large(self) -> ApiError:
        mb = self.limits.max_body_bytes / (1 << 20)
        return ApiError(413, f"body: larger than the server's limit of {mb:g} MB (chainlora serve --max-body-mb)",
                        param="body", code="request_too_large", headers={"Connection": "close"})

    def bounded(self, receive: Callable) -> Callable:
        """`receive` that stops a body at the size limit and at the body timeout. Once the body
        is complete it is left alone: a streaming response waits on it for the disconnect."""
        state = {"bytes": 0, "done": False, "deadline": time.monotonic() + self.limits.body_timeout_s}

        async def wrapped() -> dict:
            if state["done"]:
                return await receive()
            left = state["deadline"] - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise ApiError(408, f"body: not received within {self.limits.body_timeout_s:g} s "
                                    "(chainlora serve --body-timeout)", param="body", code="request_timeout",
                               headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.limits.max_body_bytes:
                    raise self.too_large()
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        return wrapped
