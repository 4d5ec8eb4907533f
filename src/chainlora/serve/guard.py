"""The server's door: authentication and the body's size and pace, before any work is done.

An ASGI middleware around the FastAPI app. It sees a request when its headers have arrived
and before a byte of its body is read, so, in this order:
- `Content-Length` with `Transfer-Encoding` is a 400 that closes the connection (RFC 9112
  6.3: the framing is ambiguous, a request could be smuggled behind it);
- the browser rules (browser.py): `Host` must name this server, a foreign page's request is a
  403 unless `--cors-origins` allows its origin, whose CORS preflights are answered here;
- with an API key set, every route but `/health` and the playground's page and static files
  (`/`, `/playground`, `/static/NAME`: they hold no data) needs `Authorization: Bearer KEY` (the
  scheme case-insensitive, the key compared in constant time): no key, no body read, 401. The one
  exception is the library's report, which a browser opens as a link and a link cannot carry a
  header: `?ticket=` from `report_ticket` (an expiring HMAC of the key, handed out by the keyed
  `/v1/library`) opens that one document;
- a `Content-Length` over the limit is a 413 at once; a chunked body is counted as it comes
  and refused at the limit; the whole body must arrive within the body timeout (408);
- a POST must say `Content-Type: application/json` (415): a web page cannot send that to
  another origin without a preflight;
- the error responses close the connection, so an unread body cannot be replayed as the
  next request.
`HEAD` is answered wherever `GET` is (routed as GET; uvicorn sends no body). A route's
unexpected exception is answered here with a 500 in OpenAI's shape and logged once with its
traceback, then as one rate-limited line (errors.log_bug), never re-raised to uvicorn (which
would log it again and drop the kept-alive connection).
Slow or piled-up connections (headers that never end, too many sockets, clients that stop
reading) are handled one level down, in connections.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any, Callable
from urllib.parse import parse_qs

from chainlora.serve.browser import Browser, header
from chainlora.serve.errors import ApiError, log_bug
from chainlora.serve.limits import Limits

PUBLIC = frozenset({"/health"})  # answers without a key, with its status only
PAGES = frozenset({"/", "/playground"})  # the playground (playground.py): a page with no data in it
STATIC = "/static/"  # its script, style and icon: /static/NAME, one level, no data either
REPORT = "/v1/library/report.html"  # the library's report: the key, or a ticket (a link cannot send a header)
TICKET_S = 3600  # how long a report ticket opens the report
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # without a key: where reload may come from; no warning


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (any case of `Bearer`), else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def public(path: str) -> bool:
    """A path answered without the key: /health, the playground's page and its static files."""
    return path in PUBLIC or path in PAGES or (path.startswith(STATIC) and "/" not in path[len(STATIC):])


def _signature(api_key: str, expires: int) -> str:
    return hmac.new(api_key.encode(), f"chainlora report {expires}".encode(), hashlib.sha256).hexdigest()


def report_ticket(api_key: str, now: float | None = None) -> str:
    """`EXPIRES.HMAC`: opens the report (only) until EXPIRES, without the key itself in the URL."""
    expires = int((time.time() if now is None else now) + TICKET_S)
    return f"{expires}.{_signature(api_key, expires)}"


def ticketed(api_key: str | None, scope: dict) -> bool:
    """A GET of the report with a valid, unexpired ticket from `report_ticket`."""
    if api_key is None or scope["path"] != REPORT or scope["method"] not in ("GET", "HEAD"):
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    expires, _, mac = (query.get("ticket") or [""])[0].partition(".")
    now = time.time()
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12 and now < int(expires) <= now + TICKET_S):
        return False
    return hmac.compare_digest(mac.encode(), _signature(api_key, int(expires)).encode())


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


async def no_content(send: Callable, headers: list[tuple[bytes, bytes]]) -> None:
    """A 204 with these headers (a CORS preflight's answer)."""
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


UNAUTHORIZED = ApiError(401, "Incorrect or missing API key (send Authorization: Bearer KEY)",
                        type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})
AMBIGUOUS = ApiError(400, "Transfer-Encoding: sent with Content-Length, the body's framing is ambiguous "
                          "(RFC 9112 6.3); the connection is closed", param="Transfer-Encoding", code="bad_http")
NOT_JSON = ApiError(415, "Content-Type: send application/json", param="Content-Type", code="unsupported_media_type")


def framing(scope: dict) -> ApiError | None:
    """A 400 for a request with both Content-Length and Transfer-Encoding (respond closes it)."""
    names = {k.lower() for k, _ in scope["headers"]}
    return AMBIGUOUS if b"content-length" in names and b"transfer-encoding" in names else None


def media_type(scope: dict) -> ApiError | None:
    """A 415 for a POST whose body is not declared JSON: a web page can send text/plain or a
    form to another origin without asking, but not application/json."""
    ctype = header(scope["headers"], b"content-type") or ""
    return NOT_JSON if scope["method"] == "POST" and ctype.split(";")[0].strip().lower() != "application/json" else None


class Guard:
    """ASGI middleware: framing, browser rules, key, declared length, content type, then a
    bounded, timed body (see the module docstring)."""

    def __init__(self, app: Any, *, api_key: str | None, limits: Limits, on_refused: Callable | None = None,
                 browser: Browser | None = None):
        self.app, self.api_key, self.limits = app, api_key, limits
        self.on_refused = on_refused or (lambda path, status: None)
        self.browser = browser or Browser(keyed=api_key is not None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self.browser.decorate(scope, send)
        error = framing(scope) or self.browser.check(scope)
        if error is None and (cors := self.browser.preflight(scope)) is not None:
            return await no_content(send, cors)  # a preflight carries no key: answered before the key check
        error = error or self.check(scope)
        if error is not None:
            self.on_refused(scope["path"], error.status)
            return await respond(send, error)
        if scope["method"] == "HEAD":  # as GET; uvicorn, which keeps the original scope, sends no body
            scope = {**scope, "method": "GET", "chainlora.method": "HEAD"}
        await self.run(scope, self.bounded(receive), send)

    async def run(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The app, its unexpected exceptions answered here (see the module docstring)."""
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log_bug(scope["path"], e)
            self.on_refused(scope["path"], 500)
            if not started:
                await respond(send, ApiError(500, f"internal error: {e.__class__.__name__}", type="server_error"))

    def check(self, scope: dict) -> ApiError | None:
        """The key (401), the declared length (400/413) and the content type (415)."""
        if not (public(scope["path"]) or authorized(self.api_key, scope["headers"]) or ticketed(self.api_key, scope)):
            return UNAUTHORIZED
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return ApiError(400, "Content-Length: not a number of bytes", param="Content-Length")
            if int(length) > self.limits.max_body_bytes:
                return self.too_large()
        return media_type(scope)

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
