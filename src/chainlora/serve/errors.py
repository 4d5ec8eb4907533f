"""Every error in OpenAI's shape, FastAPI's and Starlette's own included.

OpenAI clients read `{"error": {message, type, param, code}}`; FastAPI answers an unknown
path, a wrong method or a bad query with `{"detail": ...}`, and an unexpected exception with
plain text. `ApiError` is the one shape, and the handlers below answer all of them in it,
counting each refusal in the server's metrics (`request.app.state.server`).

Nothing here imports FastAPI at module level: limits.py (and through it the CLI's defaults in
settings.py) raises `ApiError` without loading the web stack.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("chainlora.serve")

CODES = {400: "bad_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type",
         422: "invalid_request", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Quiet:
    """At most one log line per `every` seconds, with how many it stood for: a flood of bad
    connections or requests must not become a flood of log lines (or a full disk)."""

    def __init__(self, every: float = 10.0, prefix: str = "closing a connection: "):
        self.every, self.prefix, self.last, self.skipped = every, prefix, float("-inf"), 0

    def warn(self, logger: Any, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.skipped += 1
            return
        more = f" (and {self.skipped} more like it since the last line)" if self.skipped else ""
        logger.warning("%s%s%s", self.prefix, message, more)
        self.last, self.skipped = now, 0


BUGS = Quiet(prefix="")
_TRACED: set[tuple] = set()  # the bugs whose traceback was logged once (bounded below)


def log_bug(path: str, e: BaseException) -> None:
    """An unexpected exception on `path`: its traceback once per kind (class, where it was
    raised), then one rate-limited line: a request that trips a bug again and again must not
    write a traceback each time (4 clients once wrote 22 MB of log in 10 s)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    kind = (type(e).__name__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
    if kind not in _TRACED and len(_TRACED) < 256:
        _TRACED.add(kind)
        log.error("unhandled error on %s (its traceback is logged once)", path[:200], exc_info=e)
    else:
        BUGS.warn(log, f"unhandled error on {path[:200]}: {type(e).__name__} (traceback logged before)")


def _counted(request: Any, status: int) -> None:
    """Count a refusal on the app's server (see metrics.Metrics.status)."""
    request.app.state.server.metrics.status(request.url.path, status)


async def api_error(request: Any, e: ApiError) -> Any:
    """Every handler ends here: the error as JSON with its status and headers."""
    from fastapi.responses import JSONResponse

    _counted(request, e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request: Any, e: Any) -> Any:
    """Starlette's HTTPException: 404 unknown path, 405 wrong method, ..."""
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    message = e.detail if isinstance(e.detail, str) else "request refused"
    method = request.scope.get("chainlora.method", request.method)  # HEAD, routed as GET (guard.py)
    if e.status_code == 404:
        message = f"no such route: {method} {request.url.path[:200]}"
    elif e.status_code == 405:
        message = f"method {method} is not allowed on {request.url.path[:200]}"
    return await api_error(request, ApiError(e.status_code, message, type=kind, code=CODES.get(e.status_code),
                                             headers=dict(e.headers or {})))


async def invalid(request: Any, e: Any) -> Any:
    """FastAPI's RequestValidationError (a bad query or path parameter): a 400 naming the field."""
    first = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"[:500]
    return await api_error(request, ApiError(400, message, param=loc or None))


async def gone(request: Any, e: Exception) -> Any:
    """The client left while its body was read: nobody is left to read the answer."""
    from fastapi.responses import JSONResponse

    _counted(request, 499)
    return JSONResponse(ApiError(499, "client disconnected", code="cancelled").body(), status_code=499)


async def bug(request: Any, e: Exception) -> Any:
    """Anything else: logged (log_bug); the client still gets JSON. The Guard answers a route's
    bugs itself (guard.py), so this sees only what happens outside it."""
    log_bug(request.url.path, e)
    return await api_error(request, ApiError(500, f"internal error: {e.__class__.__name__}", type="server_error"))


def install_handlers(app: Any) -> None:
    """Register the handlers on a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    for exc, handler in ((ApiError, api_error), (HTTPException, http_error), (RequestValidationError, invalid),
                         (ClientDisconnect, gone), (Exception, bug)):
        app.add_exception_handler(exc, handler)
