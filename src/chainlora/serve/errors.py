"""Every error in OpenAI's shape, FastAPI's and Starlette's own included.

OpenAI clients read `{"error": {message, type, param, code}}`; FastAPI answers an unknown
path, a wrong method or a bad query with `{"detail": ...}`, and an unexpected exception with
plain text. These handlers answer all of them in the one shape (see schema.ApiError).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("chainlora.serve")

CODES = {400: "bad_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type",
         422: "invalid_request", 429: "rate_limit_exceeded"}


def install_handlers(app: Any, metrics: Any) -> None:
    """Register the handlers on a FastAPI app; `metrics.status(path, code)` counts each."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from chainlora.serve.schema import ApiError

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, e: ApiError):
        metrics.status(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Any, e: HTTPException):  # 404 unknown path, 405 wrong method, ...
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = e.detail if isinstance(e.detail, str) else "request refused"
        if e.status_code == 404:
            message = f"no such route: {request.method} {request.url.path[:200]}"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path[:200]}"
        return await _api_error(request, ApiError(e.status_code, message, type=kind, code=CODES.get(e.status_code),
                                                  headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"[:500]
        return await _api_error(request, ApiError(400, message, param=loc or None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Any, e: ClientDisconnect):  # nobody is left to read the answer
        metrics.status(request.url.path, 499)
        return JSONResponse(ApiError(499, "client disconnected", code="cancelled").body(), status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Any, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return await _api_error(request, ApiError(500, f"internal error: {e.__class__.__name__}",
                                                  type="server_error"))
