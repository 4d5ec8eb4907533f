"""What a web page may do with the server: the rules that keep a browser from being used
against it (DNS rebinding, cross-site requests), checked by the Guard on the headers alone.

- `Host` must name this server: an IP address, `localhost` (or `*.localhost`), or a name in
  `--allowed-hosts` (`*` for any). A DNS-rebinding page reaches the server under its own
  domain name, never under an IP address, so IP literals are always safe. With an API key set
  and no `--allowed-hosts`, any Host is taken: the key is what protects the server, and a
  page cannot send it.
- A browser request from another origin (`Sec-Fetch-Site: cross-site / same-site`, or, from a
  browser that does not send it, an `Origin` other than the server's own) is a 403 unless `--cors-origins`
  lists that origin; then CORS preflights are answered (before the key: browsers send none)
  and responses carry `Access-Control-Allow-Origin`. Requests without these headers (curl,
  the SDKs, servers) are not browsers' and pass.
So a page served by this server (same origin) works, and every other page needs the operator's
word. The JSON content type (guard.py) makes every cross-origin POST need a preflight too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from chainlora.serve.errors import ApiError

Headers = list[tuple[bytes, bytes]]
METHODS = b"GET, HEAD, POST"
SAFE_TOKEN = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~ ,-]{0,1000}$")  # an Access-Control-Request-Headers value


def header(headers: Headers, name: bytes) -> str | None:
    """A request header's value (latin-1, stripped), or None."""
    return next((v.decode("latin-1").strip() for k, v in headers if k.lower() == name), None)


def hostname(host: str) -> str:
    """The name in a Host header (or an origin's netloc), without its port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def netloc(origin: str) -> str | None:
    """`host[:port]` of an origin (`scheme://host[:port]`), lower case; None for `null` or junk."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    return rest.rstrip("/") if sep and scheme in ("http", "https") and rest and "/" not in rest.rstrip("/") else None


class Browser:
    """The Host / Origin rules for one server (see the module docstring)."""

    def __init__(self, *, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (),
                 keyed: bool = False):
        self.any_host = "*" in allowed_hosts or (keyed and not allowed_hosts)
        self.hosts = {hostname(h) for h in allowed_hosts if h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {o.strip().lower().rstrip("/") for o in cors_origins if o != "*"}

    # ------------------------------------------------------------------ checks

    def check(self, scope: dict) -> ApiError | None:
        """A 400 for a Host this server does not answer to, a 403 for a foreign page's request."""
        headers = scope["headers"]
        host = header(headers, b"host")
        if host is not None and not self.host_allowed(host):
            return ApiError(400, f"Host: {host[:100]!r} is not a name of this server (chainlora serve "
                                 "--allowed-hosts NAME,...)", param="Host", code="host_not_allowed")
        origin = header(headers, b"origin")
        site = (header(headers, b"sec-fetch-site") or "").lower()
        if site in ("same-origin", "none"):
            return None  # the browser's own word (a page cannot set it); behind a proxy Origin and Host differ
        if origin is None and site not in ("cross-site", "same-site"):
            return None  # not a browser's cross-origin request
        if origin is not None and (self.same_origin(origin, host) or self.origin_allowed(origin)):
            return None
        return ApiError(403, f"cross-origin request from {(origin or 'another site')[:100]!r} refused (chainlora "
                             "serve --cors-origins ORIGIN,... lets a web page from there use this server)",
                        param="Origin", code="cross_origin")

    def host_allowed(self, host: str) -> bool:
        name = hostname(host)
        return (self.any_host or is_ip(name) or name == "localhost" or name.endswith(".localhost")
                or name in self.hosts or any(h.startswith(".") and (name.endswith(h) or name == h[1:])
                                             for h in self.hosts))

    @staticmethod
    def same_origin(origin: str, host: str | None) -> bool:
        """The page comes from this server (scheme aside: a TLS proxy in front changes it)."""
        return host is not None and netloc(origin) == host.strip().lower()

    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.strip().lower().rstrip("/") in self.origins

    # ------------------------------------------------------------------ CORS for allowed origins

    def cross_origin(self, scope: dict) -> str | None:
        """The request's Origin when it is another origin that --cors-origins allows, else None."""
        origin = header(scope["headers"], b"origin")
        if origin is None or self.same_origin(origin, header(scope["headers"], b"host")):
            return None
        return origin if self.origin_allowed(origin) else None

    def preflight(self, scope: dict) -> Headers | None:
        """The headers of a 204 for a CORS preflight from an allowed origin (`decorate` adds the
        allowed origin); None when the request is no preflight (or its origin is not allowed:
        then `check` refuses it)."""
        headers = scope["headers"]
        if scope["method"] != "OPTIONS" or header(headers, b"access-control-request-method") is None:
            return None
        origin = self.cross_origin(scope)
        if origin is None:
            return None
        asked = next((v for k, v in headers if k.lower() == b"access-control-request-headers"), b"")
        allowed = b"authorization, content-type" + (b", " + asked if asked and SAFE_TOKEN.match(asked) else b"")
        return [(b"access-control-allow-methods", METHODS), (b"access-control-allow-headers", allowed),
                (b"access-control-max-age", b"600")]

    @staticmethod
    def allow(origin: str) -> Headers:
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"Retry-After")]

    def decorate(self, scope: dict, send: Callable) -> Callable:
        """`send` that adds the CORS headers to the response of an allowed cross-origin request,
        errors included, so the page can read them; `send` itself otherwise."""
        origin = self.cross_origin(scope)
        if origin is None:
            return send
        extra = self.allow(origin)

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return wrapped


# ------------------------------------------------------------------ the playground's own documents

# The playground page (playground.py) runs only its own files: no inline script or style, no
# other origin, no framing, and Trusted Types with no policy, so that assigning a string to an
# HTML sink (innerHTML and the like) throws in the browser instead of parsing user or model text.
PAGE_POLICY = "; ".join((
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "font-src 'none'", "object-src 'none'", "media-src 'none'", "frame-src 'none'", "worker-src 'none'",
    "manifest-src 'none'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    "require-trusted-types-for 'script'", "trusted-types 'none'"))
# `chainlora report`'s HTML, served read-only: its inline style and embedded PNGs, nothing else
# (sandboxed: no script, no form, an opaque origin that cannot read the server's API).
REPORT_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                 "form-action 'none'; frame-ancestors 'none'; sandbox")


def document_headers(policy: str = PAGE_POLICY) -> dict[str, str]:
    """The headers of a document the server serves (the page, its files, the report): `policy`
    as the Content-Security-Policy, no MIME sniffing, no referrer, no framing, no sharing."""
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Cross-Origin-Opener-Policy": "same-origin",
            "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-cache",
            "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()"}
