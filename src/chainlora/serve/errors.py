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
    if e.status_code == 404:
        message = f"no such route: {request.method} {request.url.path[:200]}"
    elif e.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path[:200]}"
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
    """Anything else: logged with its traceback; the client still gets JSON."""
    log.exception("unhandled error on %s", request.url.path)
    return await api_error(request, ApiError(500, f"internal error: {e.__class__.__name__}", type="server_error"))


def install_handlers(app: Any) -> None:
    """Register the handlers on a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    for exc, handler in ((ApiError, api_error), (HTTPException, http_error), (RequestValidationError, invalid),
                         (ClientDisconnect, gone), (Exception, bug)):
        app.add_exception_handler(exc, handler)
